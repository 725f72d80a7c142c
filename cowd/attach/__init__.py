"""Layer: cowd, above the frontends (the one place they meet) and below the daemon and the CLI.
How a disk becomes a block device the user can mkfs and mount — ``cowd attach`` — and the
background daemon's lifecycle: start-up, clean-up after a killed daemon, and exit when it
serves nothing.  The run directory itself is cowd/rundir.py.

The modules, by which end of the control socket they run on:

- ``client``: the CLI's end: ping, start a daemon (``spawn_daemon``, ``ensure_daemon``),
  ``client_attach``, ``wait_gone``, and ``cleanup_dead`` when no daemon answers.
- ``attacher``: the daemon's end: :class:`~.attacher.Attacher`, the attach/detach/list
  handlers over the three frontends and the FUSE mount they share.
- ``probes``: which frontend can work on this machine (``choose_frontend``).
- ``stale``: undoing what a dead daemon left (``cleanup_stale``), run by whichever end owns
  the run dir.

This package imports nothing itself: the CLI imports only the modules it needs.

Theory of operation
-------------------
``cowd attach IMAGE`` (the CLI) asks the control socket; if no daemon answers it takes
``start.lock``, asks again, and otherwise starts ``cowd daemon`` in a new session with its
output in ``cowd.log``, and waits until the control socket answers (the daemon binds it only
when it is ready).  It then sends ``attach``.  The daemon opens the Disk (sharing parents
through its ImagePool), primes it, adds it to the FUSE mount (mounted at the first attach) and
runs ``losetup --find --show --direct-io=on RUN/fuse/NAME``: the daemon runs losetup, not the
CLI, so the daemon knows every loop device it made and can take them down itself at shutdown.
The reply names ``/dev/loopN``.  The loop driver then reads and writes the FUSE file with
direct I/O, which the FUSE frontend turns into Disk calls; discards and write-zeroes arrive as
fallocate.

``cowd detach DEVICE|IMAGE`` asks the daemon, which refuses if the loop device is in use (an
exclusive open fails: a mounted file system), else flushes the Disk, runs ``losetup -d``,
waits for the kernel to release the FUSE file, removes it from the mount and closes the Disk
(which flushes again and writes whatever metadata the codec keeps).  A daemon started by
attach exits when it serves nothing: it stops taking requests, unmounts its FUSE directory and
removes its socket and pid file; the CLI waits for that before returning.

What cowd touches: a loop device only if its backing file is the FUSE file of the attachment
(sysfs ``backing_file`` and the backing file's device and inode from LOOP_GET_STATUS64); a mount
only if it is the ``fuse.cowd`` mount at RUN/fuse; a process only through its own control
socket.  After a daemon died (SIGKILL, OOM) its FUSE mount is dead (the kernel answers
ENOTCONN): :func:`cleanup_stale`, run with the pid lock held, detaches the loop devices whose
backing file lies in that dead mount — before unmounting it, since a loop device's
``backing_file`` no longer names the directory once its mount is detached — then lazily
unmounts it and removes the stale socket.  A stale loop device still in use (a file system on
it still mounted) is detached anyway: the kernel then only marks it auto-clear, and it goes
away when that file system is unmounted; its I/O fails meanwhile, as it already did.

``--via nbd`` (cowd/frontends/nbd/attach.py): the daemon serves the Disk with its NBD server over a
socketpair, negotiates the other end itself and gives it to the kernel's nbd driver on a free
``/dev/nbdN`` (NBD_SET_SOCK is the claim; NBD_DO_IT runs in a thread of its own until the
device is disconnected).  Detach: refused while the device is held exclusively, else fsync,
NBD_DISCONNECT, wait for DO_IT, NBD_CLEAR_SOCK, close the Disk.  When the daemon dies its end
of the socketpair closes and the kernel lets the device go at its last close; one still held
open (a mounted file system) keeps showing the dead thread as its pid, and the cleanup sends it
NBD_CLEAR_SOCK (only devices the dead daemon recorded, only while they show its thread).
"""
