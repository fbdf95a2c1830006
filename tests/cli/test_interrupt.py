"""Ctrl-C inside an import is held until the import is complete, then raised as KeyboardInterrupt."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvq.cli.interrupt import interrupts_after_imports


@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """These tests need Python's own SIGINT handler. A background job (``pytest ... &``, or a CI runner that
    starts jobs that way) inherits SIGINT as ignored, and Python keeps it ignored: install the handler for
    each test, and restore what was there."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigint_inside_an_import_waits_for_the_import(tmp_path, monkeypatch):
    # A module whose import receives SIGINT half-way and then finishes initialising itself.
    (tmp_path / "kvq_test_slow_module.py").write_text(
        "import signal\n"
        "FIRST = 1\n"
        "signal.raise_signal(signal.SIGINT)\n"
        "SECOND = 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyboardInterrupt), interrupts_after_imports():
        import kvq_test_slow_module  # noqa: F401
        _spin(5.0)  # the held interrupt is delivered once the import is done (20 ms later) ...
        raise AssertionError("the held Ctrl-C was never delivered")  # ... or the test fails, never hangs
    module = sys.modules.pop("kvq_test_slow_module")
    assert module.FIRST == 1 and module.SECOND == 2  # fully initialised, not half
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_sigint_outside_an_import_is_immediate():
    with pytest.raises(KeyboardInterrupt), interrupts_after_imports():
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("not interrupted")


def test_without_the_guard_python_leaves_the_module_half_imported(tmp_path, monkeypatch):
    """The failure the guard prevents (the oracle: Python's own handler)."""
    (tmp_path / "kvq_test_half_module.py").write_text(
        "import signal\nFIRST = 1\nsignal.raise_signal(signal.SIGINT)\nSECOND = 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        import kvq_test_half_module  # noqa: F401
    assert "kvq_test_half_module" not in sys.modules  # and any module it imported first stays half-built


class _InterruptedFinaliser:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # the handler runs inside __del__, where Python ignores exceptions


def _spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def test_sigint_inside_a_finaliser_is_delivered_again():
    with pytest.raises(KeyboardInterrupt), interrupts_after_imports():
        finaliser = _InterruptedFinaliser()
        del finaliser  # the KeyboardInterrupt raised in __del__ is swallowed by the interpreter ...
        _spin(5.0)  # ... and delivered again here
        raise AssertionError("the Ctrl-C was lost")
    assert sys.unraisablehook is not None and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_the_guard_python_loses_a_sigint_in_a_finaliser():
    """The failure the guard prevents (the oracle: Python's own handler and unraisable hook)."""
    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        finaliser = _InterruptedFinaliser()
        del finaliser
        _spin(0.2)  # nothing interrupts this
    finally:
        sys.unraisablehook = previous
    assert [u.exc_type for u in seen] == [KeyboardInterrupt]


def test_these_tests_pass_where_sigint_is_ignored():
    """The README's test command started in the background (SIGINT ignored, as a shell gives a background job)
    runs these tests to the end: each installs the handler it needs, and no wait is unbounded."""
    here = Path(__file__)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k", "not ignored"],
        cwd=here.parents[2], capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
