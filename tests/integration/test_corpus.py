"""Malformed-image corpus: every codec against some 260 hostile images (88 of them truncations).

The corpus (small valid seeds made by qemu-img / qemu-io at test time, each case one copy
broken in one way) is tests/support/corpus.py.  The contract checked for every case, once
with the format probed and once forced:

    formats.open_image(path), then reading the whole disk (bounded), info() and check()
    either succeed, or raise a FormatError whose str() starts with "<one of the case's
    files>: " and names a field as "(<field>=<value>)".

Never another exception, never a hang, never huge memory.  Each case runs in a child forked
from a fork server (tests/support/forkserver.py: a fresh interpreter with formats/ imported
once, so a case costs milliseconds, not an interpreter start), with ``RLIMIT_AS`` set to its
address space at fork plus ``MEMORY_BUDGET_BYTES`` (a huge allocation becomes MemoryError,
which fails the case), and is killed after ``CASE_DEADLINE_S`` (a hang fails the case, as
does death by a signal).

Cases of a codec that has not landed yet (its ``open`` still raises NotImplementedError on
the valid seed) are marked xfail(strict=False) at run time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import corpus
from tests.support.corpus import (
    CASES,
    SEEDS,
    BuiltSeed,
    Case,
    case_in_child,
    codec_landed,
    materialize,
)
from tests.support.forkserver import ForkServer, crasher, hog, sleeper

seeds = corpus.seeds  # the session fixture that builds the corpus's seed images

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="session")
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def assert_contract(mode: str, res: dict[str, Any], case_dir: Path) -> None:
    if res["outcome"] == "other":
        pytest.fail(f"[{mode}] {res['type']} at {res['stage']}: {res['message']}\n"
                    f"{res['traceback']}")
    if res["outcome"] == "format_error":
        msg = res["message"]
        # The subject is the image at fault: the top, a file in its chain, or what a backing
        # name resolved to (which may be the case's directory itself, e.g. for "..").
        subject = msg.split(": ", 1)[0]
        assert ": " in msg and os.path.exists(subject) and \
            subject.startswith(str(case_dir.parent)), \
            f"[{mode}] message does not start with the image path: {msg}"
        assert res["field"] and f"({res['field']}=" in msg, \
            f"[{mode}] message names no field: {msg}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus(case: Case, seeds: dict[str, BuiltSeed], fork_server: ForkServer,
                tmp_path: Path, request: pytest.FixtureRequest) -> None:
    seed = seeds[case.seed]
    case_dir = tmp_path / "case"
    top = materialize(case, seeds, case_dir)
    # Only now: a broken mutation must fail, not hide behind the xfail.
    if not codec_landed(case.family, seed):
        request.applymarker(pytest.mark.xfail(strict=False, reason="codec not landed"))
    forced = case.family
    results = fork_server.call(case_in_child, (str(top), forced), str(top))
    for mode, res in results.items():
        assert_contract(mode, res, case_dir)
    probe = results["probe"]
    if case.must_fail:
        assert probe["outcome"] == "format_error", f"must be refused: {probe}"
    exact_modes = ["probe", "forced"] if SEEDS[case.seed].probeable else ["forced"]
    if case.must_open:
        for mode in exact_modes:
            res = results[mode]
            assert res["outcome"] == "ok", f"[{mode}] must open: {res}"
            assert res["format"] == case.family, f"[{mode}] opened as {res['format']}"
    if case.mutate is None:
        for mode in exact_modes:
            assert results[mode]["sha256"] == seed.sha256, \
                f"[{mode}] differs from qemu-img convert"


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES)


def test_harness_catches_memory_hog(fork_server: ForkServer) -> None:
    """The harness itself can fail: a huge allocation in the child becomes MemoryError."""
    assert fork_server.call(hog, (), "hog")["outcome"] == "MemoryError"


def test_harness_catches_hang(fork_server: ForkServer) -> None:
    with pytest.raises(pytest.fail.Exception, match="hang"):
        fork_server.call(sleeper, (), "sleeper", deadline_s=0.5)


def test_harness_catches_crash(fork_server: ForkServer) -> None:
    with pytest.raises(pytest.fail.Exception, match="signal"):
        fork_server.call(crasher, (), "crasher")
