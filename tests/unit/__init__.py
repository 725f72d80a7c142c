"""The unit tier: codecs and models: no root, no qemu, no guest, no daemon (make check-quick)."""
