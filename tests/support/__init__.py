"""Test support: what more than one test module uses.  ``peers`` (the real peers as oracles:
qemu-img, qemu-io, skip reasons), ``guest`` (the virtme-ng guest tests' harness),
``reliability`` (the daemon under a write storm, SIGKILL and the journal's oracle, with
tools.stress), ``bench`` (the benchmarks' smoke tests).  Test modules import from here, never
from each other."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
