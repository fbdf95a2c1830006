"""The error contract every bad-input test checks, in one place.

A bad input must give: the expected exit code (2 usage, 1 failure while working, 130 Ctrl-C), a
first stderr line ``kvq: error: ...`` (after any progress output) that is bounded in length and
names what is wrong, at most one ``  hint: ...`` line after it, no traceback anywhere, and an
``--out`` that holds exactly what it held before (bytes and file names).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_LINE = 400  # characters: one readable line, even when the input was huge


def snapshot(path: Path) -> dict[str, str] | str | None:
    """What ``path`` holds: None if absent, a file's sha256, or a folder's {relative path: sha256}.

    Hidden temporary siblings count too (a snapshot of the parent folder shows them).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>")
        for p in sorted(path.rglob("*"))
    }


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def run_in_process(argv: list[str], capsys) -> Outcome:
    """``kvq.cli.main(argv)`` in this process (fast); an escaping exception fails the test by itself."""
    from kvq.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def run_subprocess(argv: list[str], env: dict[str, str] | None = None, timeout: float = 300, **kwargs) -> Outcome:
    """``python -m kvq ARGV`` in a fresh process: what a user's shell sees."""
    full_env = {k: v for k, v in os.environ.items() if k != "KVQ_DEBUG"}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "kvq", *argv], capture_output=True, text=True,
                          env=full_env, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def assert_contract(outcome: Outcome, code: int, expected: str | None = None) -> str:
    """Check the one-line error contract; return the error line."""
    assert outcome.code == code, (outcome.code, outcome.stderr[-2000:])
    text = outcome.stdout + outcome.stderr
    assert "Traceback" not in text, text[-3000:]
    lines = outcome.stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("kvq: error: ") or line.startswith("kvq: interrupted")]
    assert starts, outcome.stderr[-2000:]
    tail = lines[starts[0]:]
    assert len(tail) <= 2, tail
    assert len(tail[0]) <= MAX_LINE, tail[0][:600]
    if len(tail) == 2:
        assert tail[1].startswith("  hint: ") and len(tail[1]) <= MAX_LINE, tail
    if expected is not None:
        assert expected in tail[0], tail
    return tail[0]
