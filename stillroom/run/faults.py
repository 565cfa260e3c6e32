"""Named crash points for the kill-anywhere tests (a failpoint harness, as in TiKV or FoundationDB).

`STILLROOM_FAULT=NAME:N` kills the process with SIGKILL the N-th time it reaches point NAME (N
defaults to 1). Unset -- always, outside tests -- a point costs one dict lookup. The points sit
where a crash would hurt most: between writing something and making it visible.

`NAME:N:raise` raises RuntimeError there instead (a failure the run must survive), and
`NAME:N:sleep=S` pauses S seconds (to hold a run at a known place while a test acts on it).
`STILLROOM_FAULT_RANK=R` fires on process rank R only (several-process tests).
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
    want, _, rest = spec.partition(":")
    if want != name:
        return
    rank = os.environ.get("STILLROOM_FAULT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    n, _, action = rest.partition(":")
    _seen[name] += 1
    if _seen[name] != int(n or 1):
        return
    if action == "raise":
        raise RuntimeError(f"injected failure at {name}")
    if action.startswith("sleep="):
        import time
        time.sleep(float(action[6:]))
        return
    os.kill(os.getpid(), signal.SIGKILL)
