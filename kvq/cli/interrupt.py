"""Ctrl-C that never lands inside an ``import``.

A KeyboardInterrupt raised while Python is importing a module (torch, numpy, transformers import
for seconds, and transformers imports more lazily while a model loads) leaves that module half
initialised in ``sys.modules``: what runs next fails in odd ways (numpy's lazy ``__getattr__``
recursing, torch's atexit hooks), so the process no longer ends as ``kvq: interrupted``, exit 130.
While :func:`interrupts_after_imports` is active, a SIGINT that arrives inside the import machinery
is held and delivered again every 20 ms until it lands outside any import; anywhere else it raises
KeyboardInterrupt at once, as Python's own handler does. Hand-written: neither the standard library
nor the stack offers it.
"""

from __future__ import annotations

import signal
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


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _inside_import(frame):
        # A real SIGINT to the main thread shortly: it runs this handler again, and it also interrupts a
        # blocking system call the main thread may have entered by then (a read of a FIFO, say), which
        # _thread.interrupt_main (a flag only) would not.
        timer = threading.Timer(RETRY_SECONDS, signal.pthread_kill, args=(threading.main_thread().ident, signal.SIGINT))
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt


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
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
