"""Named crash points for the kill-anywhere tests (a failpoint harness, as in TiKV or FoundationDB).

`STILLROOM_FAULT=NAME:N` kills the process with SIGKILL the N-th time it reaches point NAME (N
defaults to 1). Unset -- always, outside tests -- a point costs one dict lookup. The points sit
where a crash would hurt most: between writing something and making it visible.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter = Counter()


def point(name: str) -> None:
    spec = os.environ.get("STILLROOM_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != name:
        return
    _seen[name] += 1
    if _seen[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
