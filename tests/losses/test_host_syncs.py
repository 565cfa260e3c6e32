"""No host sync inside the loss's chunk loop. On a GPU every value the host reads off the device
(an `if` on a tensor, `.item()`, `torch.equal`, `nonzero`'s data-dependent shape) stops the host
until the device has caught up, once per chunk if it sits in the loop. The kernels decide what
they must read once per call (kernel.Known); these tests count the ops that would sync, with a
dispatch mode on whatever device the suite targets, and pin that the count does not grow with
the number of chunks. (On a CPU, where a read costs no wait, the kernels ask per chunk which rows
are dropped, kernel.ASK_PER_CHUNK: the tests below run the accelerator's path there too.)"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stillroom.losses import IGNORE_INDEX, Head, topk_targets
from stillroom.losses import kernel
from stillroom.losses.kernel import linear_mixed_loss, mixed_loss

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.equal, aten.is_nonzero, aten.masked_select}


class HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for the device (by name, for the failure message)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNCING:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _inputs(device, V=96, H=16, B=2, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, H, generator=g).to(device).requires_grad_(True)
    w = torch.randn(V, H, generator=g).mul_(0.3).to(device).requires_grad_(True)
    th, tw = torch.randn(B, S, H, generator=g).to(device), torch.randn(V, H, generator=g).mul_(0.3).to(device)
    labels = torch.randint(0, V, (B, S), generator=g).to(device)
    labels[:, :5] = IGNORE_INDEX   # prompt positions
    return h, w, th, tw, labels


def _run(path, chunk, device):
    h, w, th, tw, labels = _inputs(device)
    if path == "lean, live teacher":
        loss = linear_mixed_loss(h, w, [(Head(th, tw), 1.0)], labels, ce_weight=0.5, chunk=chunk)
        xs = (h, w)
    elif path == "lean, cached teacher":
        top = topk_targets(th @ tw.T, 8)
        loss = linear_mixed_loss(h, w, [(top, 1.0)], labels, ce_weight=0.5, chunk=chunk)
        xs = (h, w)
    else:   # the plain path on full logits; "masked": a teacher that masks tokens (-inf)
        s = (h @ w.T).detach().requires_grad_(True)
        t = th @ tw.T
        if "masking" in path:
            t[..., :7] = float("-inf")
        how = {"divergence": "jsd"} if "JSD" in path else {}
        loss = mixed_loss(s, [(t, 1.0)], labels, ce_weight=0.5, temperature=2.0 if "masking" in path else 1.0,
                          chunk=chunk, **how)
        xs = (s,)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


PATHS = ["lean, live teacher", "lean, cached teacher", "plain, live teacher", "plain, masking teacher",
         "plain, JSD, masking teacher"]


@pytest.fixture
def per_call(monkeypatch):
    """The accelerator's path on whatever device the suite targets: on a CPU the kernels ask per
    chunk which rows are dropped (kernel.ASK_PER_CHUNK: free there, cheaper than a masked pass)."""
    monkeypatch.setattr(kernel, "ASK_PER_CHUNK", frozenset())


@pytest.mark.parametrize("path", PATHS)
def test_no_host_sync_inside_the_chunk_loop(path, device, per_call):
    counts = {}
    for chunk in (64, 4):   # one chunk, then 16 of them (54 labelled rows)
        with HostReads() as m:
            _run(path, chunk, device)
        counts[chunk] = m.seen
    assert len(counts[4]) == len(counts[64]), counts   # none per chunk
    assert len(counts[4]) <= 4, counts                  # a few per call


@pytest.mark.parametrize("path", PATHS)
def test_the_chunk_count_does_not_change_the_numbers(path, device, per_call):
    """(the decisions taken once per call give every chunk count the same loss and gradient)"""
    (l1, g1), (l2, g2) = _run(path, 64, device), _run(path, 4, device)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_asking_per_chunk_gives_the_same_bits(path, device, monkeypatch):
    """Dropped rows asked per chunk (a CPU's path) and decided per call (an accelerator's) give the
    same loss and gradients, bit for bit, at one chunk and at many."""
    for chunk in (64, 4):
        monkeypatch.setattr(kernel, "ASK_PER_CHUNK", frozenset({device.type}))
        l1, g1 = _run(path, chunk, device)
        monkeypatch.setattr(kernel, "ASK_PER_CHUNK", frozenset())
        l2, g2 = _run(path, chunk, device)
        assert torch.equal(l1, l2), (chunk, l1, l2)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2)), chunk
