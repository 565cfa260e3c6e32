"""The compiled loss kernel (losses/fused.py, loss.compile) against the eager one it replaces."""
import logging

import pytest
import torch

from stillroom.losses import IGNORE_INDEX, Head, TopK, fused, kernel
from stillroom.losses.core import topk_targets


def _case(V=300, n=37, seed=0, dtype=torch.float32, masked=True):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, V, generator=g) * 3).to(dtype)
    t = (torch.randn(n, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (n,), generator=g)
    if masked:
        y[::5] = IGNORE_INDEX
    return s, t, y


def _run(s, targets, y, w_ce, T, compiled, chunk=8, **kw):
    x = s.clone().requires_grad_()
    loss = kernel.mixed_loss(x, targets, y, w_ce, T, chunk=chunk, compiled=compiled, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("w, w_ce", [(0.9, 0.1), (1.0, 0.0), (0.0, 1.0), (0.3, 0.0)])
def test_compiled_equals_eager(T, w, w_ce, ran):
    s, t, y = _case()
    targets = [(t, w)] if w else []
    le, ge = _run(s, targets, y, w_ce, T, compiled=False)
    lc, gc = _run(s, targets, y, w_ce, T, compiled=True)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
    assert ran == ["dense"] * 5 and fused._broken is None


def test_compiled_equals_eager_in_bf16_and_on_the_lean_path(ran):
    """bf16 logits (the gradient cast once, as the eager kernel casts it); the lean path with a Head
    target, the head's matmuls in bf16 as under mixed precision."""
    s, t, y = _case(dtype=torch.bfloat16)
    le, ge = _run(s, [(t, 0.9)], y, 0.1, 1.0, compiled=False)
    lc, gc = _run(s, [(t, 0.9)], y, 0.1, 1.0, compiled=True)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gc.float(), ge.float(), rtol=1e-2, atol=1e-5)   # within a bf16 rounding
    g = torch.Generator().manual_seed(1)
    H, V, n = 16, 300, 29
    h, w_s = torch.randn(n, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    ht, w_t = torch.randn(n, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    y = torch.randint(0, V, (n,), generator=g)
    y[3] = IGNORE_INDEX
    out = {}
    for c in (False, True):
        hh, ww = h.clone().requires_grad_(), w_s.clone().requires_grad_()
        loss = kernel.linear_mixed_loss(hh, ww, [(Head(ht, w_t), 0.8)], y, 0.2, 1.5, chunk=8,
                                        dtype=torch.bfloat16, compiled=c)
        loss.backward()
        out[c] = loss.detach(), hh.grad, ww.grad
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    top = topk_targets(ht @ w_t.T, 16)   # the lean path from a cache: bf16 head, compiled top-k chunks
    for c in (False, True):
        hh, ww = h.clone().requires_grad_(), w_s.clone().requires_grad_()
        loss = kernel.linear_mixed_loss(hh, ww, [(top, 0.8)], y, 0.2, 1.0, chunk=8, dtype=torch.bfloat16, compiled=c)
        loss.backward()
        out[c] = loss.detach(), hh.grad, ww.grad
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    # the lean path's kernels write the gradient over the chunk's logits (made for the call)
    assert ran == ["dense"] * 5 + ["dense_into"] * 4 + ["topk_into"] * 4


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("k", [8, 299, 300])
def test_compiled_equals_eager_on_a_top_k_target(T, k, ran):
    """A cache's rows: a few ids; nearly all of them (a tail of almost nothing: the student's tail
    mass must be summed, not taken as 1 - sum); all of them (no tail); rows with fewer entries."""
    s, t, y = _case()
    top = topk_targets(t, k, T)
    logp = top.logp.clone()
    logp[::3, k // 2:] = float("-inf")   # "no entry" (an API's shorter list)
    for target in (top, TopK(top.ids, logp, top.log_tail)):
        for w, w_ce in [(0.9, 0.1), (1.0, 0.0)]:
            le, ge = _run(s, [(target, w)], y, w_ce, T, compiled=False)
            lc, gc = _run(s, [(target, w)], y, w_ce, T, compiled=True)
            torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
    assert ran == ["topk"] * 20


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("k", [8, 299, 300])
def test_compiled_equals_eager_on_a_top_k_target_on_the_lean_path(T, k, ran):
    """The same rows on the lean path, whose kernel takes the listed ids out of the chunk's logits
    (-inf) and sums the tail from what is left, writing the gradient over them: the eager values."""
    g = torch.Generator().manual_seed(2)
    n, H, V = 37, 16, 300
    h, w_s = torch.randn(n, H, generator=g), torch.randn(V, H, generator=g)
    _, t, y = _case(n=n)
    top = topk_targets(t, k, T)
    logp = top.logp.clone()
    logp[::3, k // 2:] = float("-inf")   # "no entry" (an API's shorter list)
    for target in (top, TopK(top.ids, logp, top.log_tail)):
        for w, w_ce in [(0.9, 0.1), (1.0, 0.0)]:
            out = {}
            for c in (False, True):
                hh, ww = h.clone().requires_grad_(), w_s.clone().requires_grad_()
                loss = kernel.linear_mixed_loss(hh, ww, [(target, w)], y, w_ce, T, chunk=8, compiled=c)
                loss.backward()
                out[c] = loss.detach(), hh.grad, ww.grad
            for a, b in zip(out[True], out[False]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ran == ["topk_into"] * 4 * 4   # 29 labelled rows in chunks of 8


def test_cases_it_does_not_cover_run_the_eager_kernel_exactly(ran):
    """A teacher that masks tokens (-inf), two targets, another divergence, hard labels: the
    compiled call gives way, and the result is the eager kernel's, bit for bit. (The masked
    teacher is known before the chunk loop, kernel.Known: the compiled kernel is not even run.)"""
    s, t, y = _case()
    t_masked = t.clone()
    t_masked[:, :40] = float("-inf")
    cases = [([(t_masked, 0.9)], {}), ([(t, 0.5), (t * 0.5, 0.4)], {}),
             ([(t, 0.9)], {"divergence": "reverse_kl"}), ([(t, 0.9)], {"kind": "hard"})]
    for targets, kw in cases:
        le, ge = _run(s, targets, y, 0.1, 1.0, compiled=False, **kw)
        lc, gc = _run(s, targets, y, 0.1, 1.0, compiled=True, **kw)
        assert torch.equal(lc, le) and torch.equal(gc, ge), kw
    assert ran == []   # the masked teacher gave way before running, the other cases are not covered


def test_compiled_chunks_in_bf16_are_four_times_as_thick_and_what_they_give_way_on_runs_eager_at_its_size(
        monkeypatch, ran):
    """Automatic chunks: four times the rows where the compiled kernel runs on bf16 logits, the
    same in fp32; a chunk the kernel gives way on (a masked teacher) runs the eager kernel at the
    eager size, with its values (known before the chunk loop: the compiled kernel does not run
    on it); a chunk the caller gives is kept; the lean path does the same."""
    monkeypatch.setattr(kernel, "auto_chunk_rows", lambda V, device=None: 4)
    seen, chunk_terms = [], fused.chunk_terms
    monkeypatch.setattr(fused, "chunk_terms", lambda s, *a: (seen.append(s.shape[0]), chunk_terms(s, *a))[1])
    eager, dense_kl = [], kernel._dense_kl
    monkeypatch.setattr(kernel, "_dense_kl", lambda log_q, *a: (eager.append(log_q.shape[0]), dense_kl(log_q, *a))[1])
    s, t, y = _case(n=37, dtype=torch.bfloat16)
    t_masked = t.clone()
    t_masked[:, :40] = float("-inf")
    for target in (t, t_masked):
        le, ge = _run(s, [(target, 0.9)], y, 0.1, 1.0, compiled=False, chunk=None)
        lc, gc = _run(s, [(target, 0.9)], y, 0.1, 1.0, compiled=True, chunk=None)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gc.float(), ge.float(), rtol=1e-2, atol=1e-5)   # within a bf16 rounding
    assert seen == [16, 16, 5] * 2 and ran == ["dense"] * 3   # the masked teacher's chunks: eager alone
    assert eager == ([4] * 9 + [1]) * 3   # eager alone, then the masked teacher eager and compiled
    seen.clear()
    _run(s.float(), [(t.float(), 0.9)], y, 0.1, 1.0, compiled=True, chunk=None)   # fp32: the eager size
    _run(s, [(t, 0.9)], y, 0.1, 1.0, compiled=True, chunk=5)                     # given: kept
    assert seen == [4] * 9 + [1] + [5] * 7 + [2]
    seen.clear()
    g = torch.Generator().manual_seed(1)
    h, w_s, ht, w_t = (torch.randn(37, 16, generator=g), torch.randn(300, 16, generator=g),
                       torch.randn(37, 16, generator=g), torch.randn(300, 16, generator=g))
    labelled = int((y != IGNORE_INDEX).sum())
    t_logits = (ht @ w_t.T)[y != IGNORE_INDEX]
    t_logits_masked = t_logits.clone()
    t_logits_masked[:, :40] = float("-inf")
    for target in (Head(ht, w_t), t_logits_masked):
        seen.clear(), eager.clear(), ran.clear()
        out = {}
        for c in (False, True):
            hh, ww = h.clone().requires_grad_(), w_s.clone().requires_grad_()
            if not torch.is_tensor(target):
                loss = kernel.linear_mixed_loss(hh, ww, [(target, 0.8)], y, 0.2, 1.0, dtype=torch.bfloat16, compiled=c)
            else:   # logits for the labelled rows only: positions given as one flat row each
                keep = y != IGNORE_INDEX
                loss = kernel.linear_mixed_loss(hh[keep], ww, [(target, 0.8)], y[keep], 0.2, 1.0,
                                                dtype=torch.bfloat16, compiled=c)
            loss.backward()
            out[c] = loss.detach(), hh.grad, ww.grad
        for a, b in zip(out[True][:2], out[False][:2]):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
        # the weight gradient's bf16 products are summed over other row groups (16 vs 4): a bf16 rounding
        torch.testing.assert_close(out[True][2], out[False][2], rtol=2e-2, atol=2e-3)
        assert seen == [16] * (labelled // 16) + [labelled % 16]
        assert ran == ([] if torch.is_tensor(target) else ["dense_into"] * len(seen))
    # the masked teacher, eager alone, then "compiled": each chunk run eager at the eager size
    assert eager == ([4] * (labelled // 4) + [labelled % 4] * bool(labelled % 4)) * 2


def test_a_schedule_does_not_recompile():
    """alpha and T that move every step are tensors to the compiled kernel, not constants."""
    from torch._dynamo.utils import counters

    s, t, y = _case(V=64, n=16)
    _run(s, [(t, 0.5)], y, 0.5, 2.0, compiled=True)
    before = counters["stats"]["unique_graphs"]
    for a, T in [(0.6, 1.5), (0.7, 3.0), (0.2, 1.2)]:
        _run(s, [(t, a)], y, 1 - a, T, compiled=True)
    assert counters["stats"]["unique_graphs"] == before


def test_a_failed_compile_says_so_once_and_runs_eager(monkeypatch, caplog):
    def broken():
        def f(*a, **kw):
            raise RuntimeError("no C++ compiler found\nmore lines")
        return f

    monkeypatch.setattr(fused, "_kernel", lambda name="dense": broken())
    monkeypatch.setattr(fused, "_broken", None)
    s, t, y = _case()
    le, ge = _run(s, [(t, 0.9)], y, 0.1, 1.0, compiled=False)
    with caplog.at_level(logging.WARNING, logger="stillroom"):
        for _ in range(2):
            lc, gc = _run(s, [(t, 0.9)], y, 0.1, 1.0, compiled=True)
    assert torch.equal(lc, le) and torch.equal(gc, ge)
    said = [r.getMessage() for r in caplog.records if "loss.compile" in r.getMessage()]
    assert len(said) == 1 and "RuntimeError: no C++ compiler found" in said[0] and "more lines" not in said[0]
    # the lean path from a cache, whose kernel takes the listed ids out of the logits before it
    # runs: after a failed call the eager kernel gets the logits made again, and gives its exact values
    monkeypatch.setattr(fused, "_broken", None)
    g = torch.Generator().manual_seed(3)
    h, w_s = torch.randn(37, 16, generator=g), torch.randn(300, 16, generator=g)
    top = topk_targets(t, 8)
    out = {}
    for c in (False, True):
        hh, ww = h.clone().requires_grad_(), w_s.clone().requires_grad_()
        loss = kernel.linear_mixed_loss(hh, ww, [(top, 0.9)], y, 0.1, 1.0, chunk=8, compiled=c)
        loss.backward()
        out[c] = loss.detach(), hh.grad, ww.grad
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False]))
