"""The hot chunk of the closed-form loss, compiled: one soft target (forward KL at T: logits, or
a top-k cache's rows) and CE, or CE alone, with the gradient. The eager kernel makes about ten
passes over each (rows, V) chunk (log-softmaxes, exps, the KL's product, the gradient's sum, the
casts); `torch.compile` (Inductor) fuses them into a few loops. Measured on an AVX512-BF16 CPU
(`bench/peers.py`, the lean rows and their eager twins, over several runs): the whole KD step at 49k
vocab in 0.90-0.96x the time live (0.78x under glibc's default allocator), 0.87-0.95x from a top-k
cache. Same
values as the eager kernel within fp32 rounding (tests pin it). Every other case stays on the
eager kernel: hard labels, other divergences, several targets, a teacher that masks tokens with
-inf. On where `loss.compile` says so (`wanted`). Its chunks are twice as thick as the eager
kernel's on bf16 logits (`kernel._rows_for`).
"""
from __future__ import annotations

import logging

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .core import IGNORE_INDEX, TopK

log = logging.getLogger("stillroom")


def _kd_ce(s, t, y, m, w, w_ce, inv_t, same_t: bool, out_dtype: torch.dtype):
    """One chunk: (KD row sums, CE row sums, gradient in out_dtype). s (n, V) student logits, t (n, V)
    target logits or None (CE alone), y (n,) labels (0 where m is False), m (n,) rows that count,
    w / w_ce / inv_t 0-d tensors (not constants: a schedule changes them without a recompile).
    d/ds [w T^2 KL(p_T || q_T)] = w T (q_T - p_T); d/ds [w_ce CE] = w_ce (softmax(s) - onehot(y))."""
    s = s.float()
    mf = m.unsqueeze(-1).float()
    log_q1 = torch.log_softmax(s, dim=-1)
    onehot = torch.arange(s.shape[-1], device=s.device) == y.unsqueeze(-1)
    nll = -log_q1.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    grad = w_ce * (log_q1.exp() - onehot.float())
    kl = None
    if t is not None:
        log_q = log_q1 if same_t else torch.log_softmax(s * inv_t, dim=-1)
        log_p = torch.log_softmax(t.float() * inv_t, dim=-1)
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(-1)
        grad = grad + (w / inv_t) * (log_q.exp() - p)
    return kl, nll, (grad * mf).to(out_dtype)


def _topk_ce(s, unlisted, y, m, log_tail, w, w_ce, inv_t, same_t: bool, out_dtype: torch.dtype):
    """The full-width part of a chunk against a top-k target (a cache's rows; TopK's tail-bucket
    rule): (logsumexp of s, of s/T, the KL's tail-bucket term p_tail (log p_tail - log q_tail) per
    row, and the gradient as it is off the listed ids: w_ce (softmax(s) - onehot(y)) +
    w T (1 - r) q_T, with r = p_tail / q_tail). The listed ids' k entries per row are done by the caller (gathers and one
    scatter: compiled, those made the chunk 2x slower than eager). unlisted (n, V) bool: the tokens
    outside the row's valid ids, whose student mass is summed directly (not 1 - sum(listed), which
    cancels when the listed ids hold nearly all of it)."""
    s = s.float()
    mf = m.unsqueeze(-1).float()
    lse1 = torch.logsumexp(s, dim=-1)
    lse_t = lse1 if same_t else torch.logsumexp(s * inv_t, dim=-1)
    q = torch.exp(s * inv_t - lse_t.unsqueeze(-1))
    log_q_tail = torch.log(torch.where(unlisted, q, 0.0).sum(-1))
    tail_ok = torch.isfinite(log_tail) & torch.isfinite(log_q_tail)
    diff = torch.where(tail_ok, log_tail - log_q_tail, 0.0)
    tail_kl = torch.where(tail_ok, log_tail.exp() * diff, 0.0)
    r = torch.where(tail_ok, diff.exp(), 0.0).unsqueeze(-1)
    onehot = torch.arange(s.shape[-1], device=s.device) == y.unsqueeze(-1)
    grad = w_ce * (torch.exp(s - lse1.unsqueeze(-1)) - onehot.float()) + (w / inv_t) * (1.0 - r) * q
    return lse1, lse_t, tail_kl, (grad * mf).to(out_dtype)


def _topk_terms(s, t: TopK, y0, valid, scalars, w, w_ce, temperature, out_dtype):
    """(loss, grad) of a chunk against a top-k target: the compiled full-width part, then the k
    listed entries per row in eager (n, k) ops, as `_sparse_kl` / `_sparse_grad_` define them.
    y0: the labels with 0 where not valid; scalars: w, w_ce, 1/T as the kernel takes them."""
    logp = t.logp.float()
    ok = torch.isfinite(logp)   # -inf: "no entry" (a shorter list): that token stays in the tail
    unlisted = torch.ones(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, t.ids, ~ok)
    out = _call("topk", s, unlisted, y0, valid, t.log_tail.float(), *scalars, temperature == 1.0, out_dtype)
    if out is None:
        return None
    lse1, lse_t, tail_kl, grad = out
    s_k = s.gather(-1, t.ids).float()
    lq_k = s_k * (1.0 / temperature) - lse_t.unsqueeze(-1)
    p_k = logp.exp()
    head = torch.where((p_k > 0) & torch.isfinite(lq_k), p_k * (logp - lq_k), 0.0).sum(-1)
    kl = torch.where(valid, head + tail_kl, 0.0)
    if not torch.isfinite(kl).all():
        return None
    nll = torch.where(valid, lse1 - s.gather(-1, y0.unsqueeze(-1)).squeeze(-1).float(), 0.0)
    # on a listed id the KD part is w T (q_k - p_k), not the off-list w T (1 - r) q_k
    on_y = (t.ids == y0.unsqueeze(-1)).float()
    fix = w_ce * (torch.exp(s_k - lse1.unsqueeze(-1)) - on_y) + w * temperature * (lq_k.exp() - p_k)
    keep = ok & valid.unsqueeze(-1)
    _put(grad, t.ids, torch.where(keep, fix.to(grad.dtype), grad.gather(-1, t.ids)))
    return w_ce * nll.sum() + w * temperature * temperature * kl.sum(), grad


def _put(x, ids, src):
    """x.scatter_(-1, ids, src) for an (n, V) x whose rows list each id once, as one index_put_ on
    its flat view: the same values, where a CPU's bf16 scatter_ takes a slow path in torch 2.13
    (~1 ms per (128, 49152) chunk, 80x the fp32 one; index_put_ takes 0.01 ms in either dtype)."""
    if not x.is_contiguous():
        return x.scatter_(-1, ids, src)
    rows = torch.arange(0, x.numel(), x.shape[-1], device=x.device).unsqueeze(-1)
    x.view(-1).index_put_(((ids + rows).view(-1),), src.reshape(-1))
    return x


VOCAB_MIN = 8192   # auto compiles from this vocabulary up (see `wanted`)


def wanted(setting, vocab: int, device) -> bool:
    """loss.compile -> whether a loss of this vocabulary on this device runs compiled. true/false as
    said; auto: on a CPU at a vocabulary of VOCAB_MIN or more. Below it a step's loss takes
    milliseconds either way and the compile's seconds do not pay back in a short run (the kernel
    itself is faster from 1k up); on a GPU it is not measured yet."""
    if setting != "auto":
        return bool(setting)
    return torch.device(device).type == "cpu" and vocab >= VOCAB_MIN


_compiled: dict = {}
_broken: str | None = None   # why the compiled kernel failed in this process (then it is not tried again)


def _kernel(name: str = "dense"):
    if name not in _compiled:
        _compiled[name] = torch.compile({"dense": _kd_ce, "topk": _topk_ce}[name], dynamic=True, fullgraph=True)
    return _compiled[name]


def _call(name: str, *args):
    """A compiled kernel's outputs; None when compiling failed (no C++ compiler, an Inductor
    failure): said once, and the eager kernel runs from then on."""
    global _broken
    try:
        return _kernel(name)(*args)
    except Exception as e:
        _broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("loss.compile: torch.compile of the loss kernel failed (%s); the eager kernel runs "
                    "(loss.compile=false hides this)", _broken)
        return None


def chunk_terms(s, targets, y, keep, w_ce, temperature, how, out_dtype):
    """(loss, grad in out_dtype) for a chunk the compiled kernel covers, else None (the caller
    runs the eager kernel). Covers: CE alone, or one soft forward-KL target (logits or TopK), with
    or without CE, over the same rows (keep == labelled rows, as in training)."""
    if _broken is not None or _get_current_dispatch_mode() is not None:   # a mode (a memory count) sees eager ops
        return None
    name, _ = how
    targets = [(t, w) for t, w in targets if w]
    if y is None or len(targets) > 1 or (targets and name != "forward_kl"):
        return None
    valid = y != IGNORE_INDEX
    if not torch.equal(keep, valid):
        return None
    t, w = targets[0] if targets else (None, 0.0)
    if (not w and not w_ce) or not (t is None or torch.is_tensor(t) or isinstance(t, TopK)):
        return None
    y0 = torch.where(valid, y, 0)
    # tensors, not constants: a schedule changes them without a recompile
    scalars = [torch.tensor(float(v), dtype=torch.float32, device=s.device) for v in (w, w_ce, 1.0 / temperature)]
    if isinstance(t, TopK):
        return _topk_terms(s, t, y0, valid, scalars, w, w_ce, temperature, out_dtype)
    out = _call("dense", s, t, y0, valid, *scalars, temperature == 1.0, out_dtype)
    if out is None:
        return None
    kl, nll, grad = out
    loss = w_ce * torch.where(valid, nll, 0.0).sum()
    if kl is not None:
        kl = torch.where(valid, kl, 0.0)
        if not torch.isfinite(kl).all():   # a teacher that masks tokens (-inf): the eager kernel's rule
            return None
        loss = loss + w * temperature * temperature * kl.sum()
    return loss, grad
