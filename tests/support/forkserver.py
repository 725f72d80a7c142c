"""A fork server: a function run in a forked, memory-capped child, killed at a deadline
(tests/integration/test_corpus.py runs every case of the malformed-image corpus so).

Theory of operation.  Forking pytest itself may inherit the locks of its threads (e.g. trio's
thread cache), and multiprocessing's forkserver re-imports ``__main__``; so the server is a
fresh, single-threaded interpreter (``python -m tests.support.forkserver``, started by
:class:`ForkServer`) that imports a function's module once and forks one child per call: a
call costs milliseconds, not an interpreter start.  A function travels by name (module and
function): a module-level function of a tests/support module (test modules import no test
module, tests/support/__init__.py, and neither does the server), with JSON arguments and a
JSON answer.

The server reads one JSON request a line on stdin -- {"id": n, "module": name, "fn": name,
"args": [...], "deadline_s": s} -- and answers one JSON line with the same id on its private
copy of stdout: the child's answer, or how it died.  The child runs with ``RLIMIT_AS`` set to
its address space at fork plus :data:`MEMORY_BUDGET_BYTES` (a huge allocation becomes
MemoryError) and is killed after the request's deadline (a hang).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import ROOT

MiB = 1 << 20

# A case may use this much address space beyond what the test process had when it forked.
# Generous for a 4 MiB disk (qcow2's largest legal L1 table, 32 MiB, fits several times);
# a codec that trusts a 2^32-entry count from the file does not.
MEMORY_BUDGET_BYTES = 384 * MiB
# A case (two opens, two bounded reads, info, check) must finish within this.
CASE_DEADLINE_S = 20.0


# ---- the server (its own interpreter) ---------------------------------------------------------

def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def serve() -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints of the code under test must not reach the protocol pipe
    for line in sys.stdin:
        req = json.loads(line)
        module = importlib.import_module(req["module"])  # once: the children inherit it
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                limit = _vm_size_bytes() + MEMORY_BUDGET_BYTES
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                view = memoryview(json.dumps(getattr(module, req["fn"])(*req["args"])).encode())
                while view:
                    view = view[os.write(w, view):]
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.close(w)
        chunks, hung = [], False
        deadline = time.monotonic() + req["deadline_s"]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                hung = True
                break
            if not select.select([r], [], [], left)[0]:
                continue
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(r)
        if hung:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        reply = {"id": req["id"], "hung": hung,
                 "answer": b"".join(chunks).decode(errors="replace"),
                 "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                 "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


# ---- the client (the test process) ------------------------------------------------------------

class ForkServer:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.forkserver"],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._buf = b""
        self._next_id = 0

    def call(self, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], what: str,
             deadline_s: float = CASE_DEADLINE_S) -> dict[str, Any]:
        """fn(*args) in a forked, memory-capped child, killed at the deadline; its answer.

        fn must be a module-level function of a tests/support module (it travels by name)."""
        assert fn.__module__.startswith("tests.support."), \
            f"{fn.__module__}.{fn.__name__}: the fork server runs tests/support functions only"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._next_id += 1
        req = {"id": self._next_id, "module": fn.__module__, "fn": fn.__name__,
               "args": list(args), "deadline_s": deadline_s}
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        give_up = time.monotonic() + deadline_s + 30  # the server itself must answer
        while True:  # skip answers to calls that were interrupted (e.g. by pytest-timeout)
            while b"\n" not in self._buf:
                left = give_up - time.monotonic()
                assert left > 0 and select.select([fd], [], [], left)[0], "fork server stuck"
                chunk = os.read(fd, 1 << 16)
                assert chunk, f"fork server died (exit {self.proc.poll()})"
                self._buf += chunk
            line, self._buf = self._buf.split(b"\n", 1)
            reply = json.loads(line)
            if reply["id"] == self._next_id:
                break
        if reply["hung"]:
            pytest.fail(f"{what}: hang (no answer within {deadline_s} s)")
        if reply["signal"]:
            pytest.fail(f"{what}: child killed by signal {reply['signal']}")
        if reply["exit"] != 0 or not reply["answer"]:
            pytest.fail(f"{what}: child crashed (exit {reply['exit']})")
        return dict(json.loads(reply["answer"]))

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


# ---- children that misbehave on purpose: the harness's own tests ------------------------------

def hog() -> dict[str, Any]:
    try:
        bytearray(2 * MEMORY_BUDGET_BYTES)
    except MemoryError:
        return {"outcome": "MemoryError"}
    return {"outcome": "allocated"}


def sleeper() -> dict[str, Any]:
    time.sleep(60)
    return {}


def crasher() -> dict[str, Any]:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


if __name__ == "__main__":
    serve()
