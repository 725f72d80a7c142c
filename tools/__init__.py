"""Layer: tools (not part of the product; pytest collects none of it).  The benchmarks (one
entry point: ``python -m tools.bench SUITE``, what they share in :mod:`tools.benchlib`), the
guest runner (:mod:`tools.guest`), the stress writer (:mod:`tools.stress`) and the VM root
disks and boots (:mod:`tools.vm`).  Run from the repository's root: ``python -m tools.x``
finds the package there, and pytest's rootdir puts the same directory on ``sys.path``."""
