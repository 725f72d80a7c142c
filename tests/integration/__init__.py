"""The integration tier: against real peers (root, FUSE, loop devices, qemu-img, NBD
servers, the daemon)."""
