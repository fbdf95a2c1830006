"""Ctrl-C that never lands inside an ``import``.

A KeyboardInterrupt raised while Python is importing a module (torch, numpy, transformers import
for seconds, and transformers imports more lazily while a model loads) leaves that module half
initialised in ``sys.modules``: what runs next fails in odd ways (numpy's lazy ``__getattr__``
recursing, torch's atexit hooks), so the process no longer ends as ``kvq: interrupted``, exit 130.
While :func:`interrupts_after_imports` is active, a SIGINT that arrives inside the import machinery
is held and delivered again every 20 ms until it lands outside any import; anywhere else it raises
KeyboardInterrupt at once, as Python's own handler does. A KeyboardInterrupt raised while the
interpreter runs a finaliser (a ``__del__`` or weakref callback the garbage collector called) is
"ignored" by Python: it prints a traceback and the Ctrl-C is lost. The context therefore also
catches that case through :data:`sys.unraisablehook` and delivers the interrupt again. Hand-written:
neither the standard library nor the stack offers it.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

RETRY_SECONDS = 0.02


def _inside_import(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _deliver_again() -> None:
    # A real SIGINT to the main thread shortly: it runs the handler again, and it also interrupts a blocking
    # system call the main thread may have entered by then (a read of a FIFO, say), which
    # _thread.interrupt_main (a flag only) would not.
    timer = threading.Timer(RETRY_SECONDS, signal.pthread_kill, args=(threading.main_thread().ident, signal.SIGINT))
    timer.daemon = True
    timer.start()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _inside_import(frame):
        _deliver_again()
        return
    raise KeyboardInterrupt


def _hook_unraisable(previous):  # noqa: ANN001, ANN202 - sys.unraisablehook's own signature
    def hook(unraisable) -> None:  # noqa: ANN001
        if unraisable.exc_type is KeyboardInterrupt:  # our Ctrl-C, swallowed by a finaliser: send it again
            _deliver_again()
            return
        previous(unraisable)

    return hook


@contextmanager
def interrupts_after_imports() -> Iterator[None]:
    """Hold Ctrl-C while the main thread is importing (see the module docstring); a no-op off the main thread
    or where SIGINT is ignored (a background job)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:  # ignored, or someone else's handler: leave it
        yield
        return
    previous_hook = sys.unraisablehook
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _hook_unraisable(previous_hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
