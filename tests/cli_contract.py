"""Run the command line in-process and check the contract every run must keep.

The contract (README, "Bad input"): a run ends with exit 0, or with exit 2 and
exactly one line ``onnx-lowrank: error: …`` on stderr and nothing on stdout;
never a traceback or an ``internal error``; nothing reaches the terminal on
exit 0 but what the command prints on stdout (no numpy warning, no onnxruntime
log line); the input files keep their bytes; a failed run leaves the folders as
they were; a run that succeeds leaves its outputs and nothing else.
``verify`` may also exit 1 (outputs differ beyond tolerance) with nothing on stderr.

Running ``onnx_lowrank.cli.main`` in the test process keeps hundreds of runs
fast; stdout and stderr are captured at the file-descriptor level too, so a
message written by C++ code (onnxruntime's logger) is seen as well, and Python
warnings are recorded (``always``), so one that would reach a terminal is seen
even when the same warning was already raised by an earlier run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_lowrank.cli

ERROR_PREFIX = "onnx-lowrank: error: "


@dataclass
class Outcome:
    """What one in-process run of the CLI did."""

    argv: list[str]
    code: int
    stdout: str
    stderr: str
    warnings: list[str] = field(default_factory=list)

    @property
    def error(self) -> str:
        """The one-line error message, without the prefix ('' when the run did not fail with one)."""
        lines = self.stderr.splitlines()
        if self.code == 2 and len(lines) == 1 and lines[0].startswith(ERROR_PREFIX):
            return lines[0].removeprefix(ERROR_PREFIX)
        return ""


@contextlib.contextmanager
def _captured_fd(fd: int, into: list[str]) -> Iterator[None]:
    """Point file descriptor ``fd`` at a temporary file; what was written is appended to ``into``."""
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            into.append(sink.read().decode(errors="replace"))


def run_cli(argv: Sequence[str | os.PathLike[str]]) -> Outcome:
    """``onnx_lowrank.cli.main(argv)`` in this process, with everything it prints captured."""
    args = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    fd_out: list[str] = []
    fd_err: list[str] = []
    debug = os.environ.pop("ONNX_LOWRANK_DEBUG", None)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        with (
            _captured_fd(1, fd_out),
            _captured_fd(2, fd_err),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            code = onnx_lowrank.cli.main(args)
        stdout = out.getvalue() + "".join(fd_out)
        stderr = err.getvalue() + "".join(fd_err)
    finally:
        if debug is not None:
            os.environ["ONNX_LOWRANK_DEBUG"] = debug
    return Outcome(args, code, stdout, stderr, [f"{w.category.__name__}: {w.message}" for w in caught])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones too), with the content hash of each file."""
    state: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = "link -> " + os.readlink(path)
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = sha256(path)
    return state


def violations(outcome: Outcome, before: dict[str, str], after: dict[str, str], outputs: Sequence[str] = ()) -> list[str]:
    """Every way ``outcome`` breaks the contract; ``before``/``after`` are snapshots of the run's folder,
    ``outputs`` the paths (relative to it) a successful run may add or replace."""
    found = []
    text = outcome.stdout + outcome.stderr
    if "Traceback" in text:
        found.append("traceback")
    if "internal error" in text:
        found.append("internal error")
    if outcome.warnings:
        found.append(f"warning reached the terminal: {outcome.warnings[0]}")
    verify_differs = outcome.code == 1 and outcome.argv[:1] == ["verify"] and "outputs DIFFER" in outcome.stdout
    if outcome.code == 0 or verify_differs:
        if outcome.stderr.strip():
            found.append(f"stderr on success: {outcome.stderr.strip().splitlines()[0][:200]}")
    elif outcome.code == 2:
        if not outcome.error.strip():
            found.append(f"exit 2 without exactly one error line: {outcome.stderr[:300]!r}")
        if outcome.stdout.strip():
            found.append("stdout on failure")
    else:
        found.append(f"exit {outcome.code}: {outcome.stderr.strip()[:300]}")
    changed = {k for k in before if before[k] != after.get(k)}
    added = set(after) - set(before)
    allowed = set(outputs) if outcome.code == 0 else set()
    if changed - allowed:
        found.append(f"changed: {sorted(changed - allowed)}")
    if added - allowed:
        found.append(f"left behind: {sorted(added - allowed)}")
    return found
