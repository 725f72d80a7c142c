"""The guest tier: anything that boots a VM (virtme-ng or qemu TCG)."""
