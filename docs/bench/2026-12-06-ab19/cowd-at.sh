#!/bin/bash
# Run cowd from the worktree /work/wt-bisect (whatever commit it has checked out) with
# /work/main's venv, from a neutral cwd so that `-m` does not put a repo on sys.path first.
# `serve` gets --workers 0 when that commit knows the option (a single-process daemon, as
# the old code was).
WT=/work/wt-bisect
args=("$@")
if [ "$1" = serve ] && grep -q '"--workers"' $WT/cowd/cliargs.py $WT/cowd/cli.py 2>/dev/null; then
    args+=(--workers 0)
fi
cd /
PYTHONPATH=$WT exec /work/main/.venv/bin/python -m cowd.cli "${args[@]}"
