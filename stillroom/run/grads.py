"""Data-parallel gradients: the mean of a replicated trainee's gradients over the processes, as
DDP computes it (each divided by the number of processes, then summed), in flat buckets.

`Reducer` overlaps that communication with the step's last backward, as DDP does: a hook on each
parameter counts the gradients that are final, and a bucket is all-reduced (asynchronously) as
soon as all of its parameters' are, while the backward goes on through the layers below. Buckets
are parameters in reverse registration order (the order a decoder's backward finishes them:
head, last layer, ..., embeddings) and are launched strictly in that order, on every process,
whatever order the gradients come in; `finish` launches the ones left (a parameter the step did
not use, or a process whose step failed: it still takes part, so every process runs the same
collectives in the same order, and the step's failure flag follows them) and waits for all. Each
element is summed across the processes exactly as one all-reduce after the backward sums it,
whatever the bucketing, so the result is that path's, bit for bit.
"""
from __future__ import annotations

from collections import deque

import torch


def _flat(params, world: int):
    from torch._utils import _flatten_dense_tensors

    for p in params:
        if p.grad is None:   # an unused parameter takes part with zeros, as under DDP
            p.grad = torch.zeros_like(p)
    return _flatten_dense_tensors([p.grad for p in params]).div_(world)


def _back(params, flat):
    from torch._utils import _unflatten_dense_tensors

    grads = [p.grad for p in params]
    for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(f)


def buckets(params: list, size: int) -> list[list]:
    """Consecutive parameters in groups of at most `size` elements (one larger parameter alone)."""
    out, n = [], 0
    for p in params:
        if not out or n + p.numel() > size:
            out.append([])
            n = 0
        out[-1].append(p)
        n += p.numel()
    return out


def average_grads(params, world: int, bucket: int = 1 << 24):
    """Mean of the parameters' gradients over the processes, after the backward, bucket by bucket."""
    for group in buckets(list(params), bucket):
        flat = _flat(group, world)
        torch.distributed.all_reduce(flat)
        _back(group, flat)


class Reducer:
    """average_grads overlapped with the backward (see the module's text). arm() before the step's
    last backward; finish() after it, or after a failure, on every process; close() removes the
    hooks. At most `in_flight` buckets' flat copies are held at once."""

    def __init__(self, params, world: int, bucket: int = 1 << 24, in_flight: int = 2):
        self.world, self.in_flight = world, in_flight
        self.buckets = buckets(list(params)[::-1], bucket)
        self.of = {id(p): i for i, group in enumerate(self.buckets) for p in group}
        self.ready = [0] * len(self.buckets)
        self.next, self.armed, self.works = 0, False, deque()
        self.hooks = [p.register_post_accumulate_grad_hook(self._done) for group in self.buckets for p in group]

    def arm(self):
        self.armed = True

    def _done(self, p):
        if not self.armed:   # an earlier micro-batch: its gradient is not final yet
            return
        b = self.of[id(p)]
        if b < self.next:   # (an objective that backwards into a parameter twice in the last micro-batch)
            raise RuntimeError("a gradient arrived after its bucket was all-reduced: this objective cannot "
                               "overlap gradient communication with the backward")
        self.ready[b] += 1
        while self.next < len(self.buckets) and self.ready[self.next] == len(self.buckets[self.next]):
            self._launch()

    def _launch(self):
        group = self.buckets[self.next]
        flat = _flat(group, self.world)
        self.works.append((group, flat, torch.distributed.all_reduce(flat, async_op=True)))
        self.next += 1
        while len(self.works) > self.in_flight:
            self._wait()

    def _wait(self):
        group, flat, work = self.works.popleft()
        work.wait()
        _back(group, flat)

    def finish(self):
        """Every bucket not launched yet, in order; then every one waited and copied back."""
        while self.next < len(self.buckets):
            self._launch()
        while self.works:
            self._wait()
        self.ready, self.next, self.armed = [0] * len(self.buckets), 0, False

    def close(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []
