"""The kernel-shim frontend: ``abi`` (the Python mirror of kmod/cowd_uapi.h, no I/O) and
``channel`` (/dev/cowdN and its message channel under trio).  Imports nothing itself."""
