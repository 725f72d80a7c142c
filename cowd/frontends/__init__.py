"""Layer: cowd frontends — the only code that knows about sockets, /dev/fuse, the kernel
shim's channel or block devices; below them everything speaks guest offsets and extents.

One package per way a Disk reaches the user, each split the same way: a sans-I/O codec (no
trio, no sockets: bytes in, events out), a thin trio adapter that serves a
:class:`~cowd.disk.Disk` with it, and helpers for the kernel side (attach, mount, probes):

- ``nbd/``: ``wire`` (the protocol's constants, struct layouts, limits, errors, events and
  reply builders), ``protocol`` (the connection state machine), ``server`` (the trio NBD
  server), ``attach`` (hands a socketpair to the kernel's nbd client: ``/dev/nbdN``).
- ``fuse/``: ``protocol`` (``/dev/fuse`` requests and the namespace), ``server`` (the trio
  workers), ``mount`` (mount, unmount, mountinfo, the probe).
- ``kmod/``: ``abi`` (mirror of kmod/cowd_uapi.h), ``channel`` (``/dev/cowdN`` and its
  channel under trio).
- ``loop``: loop devices (sysfs, LOOP_GET_STATUS64, losetup) for the FUSE file.

Invariants: no frontend imports another (cowd/attach/ is where they meet), and the codecs
import no trio; tests/unit/test_layers.py checks both.  This package imports nothing itself, so
importing a codec does not pull in the adapters.
"""
