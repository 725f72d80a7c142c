"""Layer: cowd frontends (fuse).  One mounted directory holding one regular file per served
:class:`~cowd.disk.Disk`, of the disk's size, so that ``losetup --direct-io=on --find
--show DIR/NAME`` gives the user a real block device on any kernel that has FUSE and loop.

The FUSE kernel protocol is spoken directly on ``/dev/fuse`` (structures and names from the
kernel's UAPI header ``linux/fuse.h``), not through pyfuse3: pyfuse3 (3.5) registers no
``fallocate`` handler, so libfuse answers FUSE_FALLOCATE with ENOSYS and the kernel then fails
every punch-hole and zero-range on the mount with EOPNOTSUPP — a loop device could neither
discard nor write zeroes, and a guest's ``fstrim`` could never shrink the overlay.  Speaking
the protocol also lets us choose per-open flags (FOPEN_PARALLEL_DIRECT_WRITES) and INIT
parameters (max_background, max_pages) that pyfuse3 does not expose, and pyfuse3's one mount
per process limit goes away (we still use one directory for every disk).

The package: ``protocol`` (sans-I/O codec and namespace, no trio), ``server`` (the trio
adapter and :func:`~.server.mount_fuse`), ``mount`` (mounting, mountinfo, stale unmount, the
probe).  It imports nothing itself, so importing the codec does not pull in trio.
"""
