"""Test support: what more than one test module uses, or what a test's subprocess must import
by name.  Test modules import from here, never from each other (tests/unit/test_layers.py
checks it), and nothing here imports a test module.

- ``peers``: the real peers as oracles (qemu-img, qemu-io, libvhdi's vhdimount), skip reasons,
  and ``COWD``, the cowd command a test runs.
- ``host``: the kernel's view (loop devices, mounts, processes) from sysfs and /proc.
- ``attach``: ``cowd attach`` in a run dir of a test's own (``Env``), and why it cannot run.
- ``reliability``: the daemon as ``cowd serve`` (``start_daemon``, ``wait_listening``, the
  ``daemons`` fixture), the write storm, SIGKILL and the journal's oracle, with tools.stress.
- ``nbdserve``: ``cowd serve`` driven by real NBD clients (the ``serve`` fixture, in the
  daemon and from two workers; ``Served``; ``nbdsh``), for the NBD server and boot-trace tests.
- ``killpoints``: a cowd command killed (SIGKILL) just before its N-th change to a file, for
  the crash tests of the image commands (commit, rebase, resize).
- ``corpus``: the malformed-image corpus (seeds, cases, what a child does with one);
  ``forkserver``: the fork server its cases run in; ``ondisk``: an image file's fields poked
  in place; ``corruption``: randomly corrupted images for the fuzz tests.
- ``trees``: file trees written to a disk and compared back.
- ``guest``: the virtme-ng guest tests' harness; ``bench``: the benchmarks' smoke tests.
- ``nbdspec``: the NBD protocol as a client writes it (the spec's numbers, encoders, reply
  parsers), independent of cowd's codec, for the codec's unit tests.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
