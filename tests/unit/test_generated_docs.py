"""The man page and the bash completion in contrib/ are what tools/gen_manpage.py makes from
the parser (cowd/cliargs.py) today: a flag added to the parser without regenerating them
fails here.  Also: every command of the parser has its section and its completion case, and
the completion is valid bash."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from cowd.cliargs import build_parser
from tools import gen_manpage


def test_committed_files_match_the_parser() -> None:
    for path, text in gen_manpage.generated().items():
        assert path.exists(), f"{path} missing: run .venv/bin/python -m tools.gen_manpage"
        assert path.read_text() == text, (
            f"{path.name} differs from the parser: run .venv/bin/python -m tools.gen_manpage")


def test_every_command_is_documented_and_completed() -> None:
    page, completion = gen_manpage.man_page(), gen_manpage.completion()
    commands = gen_manpage._subcommands(build_parser())
    assert {"commit", "rebase", "resize", "snapshot", "convert", "daemon"} <= set(commands)
    for name in commands:
        assert f'.SS "cowd {name}' in page, name
        assert f"        {name}) opts=" in completion, name
    assert "\\-\\-no\\-idle\\-exit" in page and "writeback unsafe" in completion


def test_completion_is_valid_bash() -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash not installed")
    p = subprocess.run(["bash", "-n"], input=gen_manpage.completion(), text=True,
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    script = gen_manpage.completion() + (
        'COMP_WORDS=(cowd snapshot -); COMP_CWORD=2; _cowd; echo "${COMPREPLY[@]}"\n'
        'COMP_WORDS=(cowd convert -t ""); COMP_CWORD=3; _cowd; echo "${COMPREPLY[@]}"\n')
    p = subprocess.run(["bash"], input=script, text=True, capture_output=True, timeout=30)
    lines = p.stdout.splitlines()
    assert "-c" in lines[0].split() and "-l" in lines[0].split(), p.stdout
    assert lines[1].split() == ["writeback", "unsafe"], p.stdout


def test_stop_help_says_what_the_drain_does() -> None:
    """`cowd stop` sends SIGTERM whatever is mounted (cowd/daemoncli.py); the drain detaches a
    busy loop or NBD device anyway and leaves a busy kernel-shim device
    (cowd/attach/attacher.py).  The help once promised a refusal that never happened."""
    page = " ".join(gen_manpage.man_page().split())
    stop = page[page.index('.SS "cowd stop'):]
    stop = stop[:stop.index(".SS", 4)].replace("\\-", "-")
    assert "refused" not in stop, stop
    assert "detached or disconnected anyway" in stop and "new daemon" in stop, stop
