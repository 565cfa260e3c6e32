"""Feedback on long work, one switch for all of it: every counted phase gets a tqdm bar (shown
once it has run for 2 s, so quick phases stay quiet), every other long phase one line saying what
it is doing. `--no-progress` (set_progress(False)) turns the bars off; the training loop then logs
a plain line every train.log_every steps instead. Only the main process of a launch shows bars."""
from __future__ import annotations

import contextlib
import logging
import os
import time

from tqdm.auto import tqdm

log = logging.getLogger("stillroom")

_progress = True


def set_progress(on: bool):
    global _progress
    _progress = bool(on)


@contextlib.contextmanager
def progress(on: bool):
    """Bars off inside the block when `on` is False (a library call with progress=False); the
    switch as it was afterwards."""
    global _progress
    was, _progress = _progress, _progress and bool(on)
    try:
        yield
    finally:
        _progress = was


def progress_on() -> bool:
    return _progress and int(os.environ.get("RANK", "0")) == 0


def bar(iterable=None, **kw):
    """tqdm, shown only after 2 s of work, off with --no-progress and off the main process."""
    kw.setdefault("delay", 2.0)
    kw.setdefault("leave", False)
    return tqdm(iterable, disable=not progress_on(), **kw)


@contextlib.contextmanager
def phase(what: str, after: float = 2.0):
    """`with phase("loading x"):` says what is being done once it has taken `after` seconds
    (and then how long it took), so quick work, and a command refused at once, print nothing."""
    import threading

    t0 = time.perf_counter()
    said = threading.Event()

    def say():
        said.set()
        log.info("%s ...", what)

    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if said.is_set():
        log.info("%s: done in %.1f s", what, time.perf_counter() - t0)
