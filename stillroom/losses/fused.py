"""The hot chunk of the closed-form loss, compiled: one soft target (forward KL at T: logits, or
a top-k cache's rows) and CE, or CE alone, with the gradient. The eager kernel makes about ten
passes over each (rows, V) chunk (log-softmaxes, exps, the KL's product, the gradient's sum, the
casts); `torch.compile` (Inductor) fuses them into three loops per chunk (the row maxima, the
row sums, then the loss and the gradient), with no full-width fp32 buffer (see `_kd_ce`). On the
lean path the chunk's logits are made for the kernel, which writes the gradient over them (the
`_into` kernels). Measured on an AVX512-BF16 CPU (`bench/peers.py`, the lean rows and their eager
twins, eight runs): the whole KD step at 49k vocab in 0.75-0.93x the time live, 0.70-0.83x from a
top-k cache. Same values as the eager kernel within fp32 rounding (tests pin it). Every other
case stays on the eager kernel: hard labels, other divergences, several targets, a teacher that
masks tokens with -inf. On where `loss.compile` says so (`wanted`). Its chunks are four times as
thick as the eager kernel's on bf16 logits (`kernel._rows_for`).
"""
from __future__ import annotations

import logging

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from stillroom.losses.core import IGNORE_INDEX, TopK

log = logging.getLogger("stillroom")


def _kd_ce(s, t, y, m, w, w_ce, inv_t, same_t: bool, out_dtype: torch.dtype):
    """One chunk: (KD row sums, CE row sums, gradient in out_dtype). s (n, V) student logits, t (n, V)
    target logits or None (CE alone), y (n,) labels (0 where m is False), m (n,) rows that count,
    w / w_ce / inv_t 0-d tensors (not constants: a schedule changes them without a recompile).
    d/ds [w T^2 KL(p_T || q_T)] = w T (q_T - p_T); d/ds [w_ce CE] = w_ce (softmax(s) - onehot(y)).

    Written for Inductor's CPU loops: only per-row log-sum-exps are kept, and every full-width
    exp is its own expression with one use. Inductor stores a full-width node holding an exp that
    has two uses (`should_realize_on_reuse`: exp is "heavy" on CPU) as an fp32 (n, V) buffer, one
    more write and read of the chunk; `log_softmax` made two of them here, and recomputing the exp
    in the loop that needs it costs less (the kernel in ~0.6x the time at 49k, bf16 logits). So p
    is written twice, as exp(log_p) and exp(tt + (-lse_t)): the same value, not merged by the
    graph's common-subexpression pass."""
    s = s.float()
    mf = m.unsqueeze(-1).float()
    lse1 = torch.logsumexp(s, dim=-1).unsqueeze(-1)
    nll = (lse1 - s.gather(-1, y.unsqueeze(-1))).squeeze(-1)
    onehot = (torch.arange(s.shape[-1], device=s.device) == y.unsqueeze(-1)).float()
    if t is None:
        return None, nll, (w_ce * (torch.exp(s - lse1) - onehot) * mf).to(out_dtype)
    st = s if same_t else s * inv_t                    # s / T
    lse_s = lse1 if same_t else torch.logsumexp(st, dim=-1).unsqueeze(-1)
    tt = t.float() * inv_t                              # t / T
    lse_t = torch.logsumexp(tt, dim=-1).unsqueeze(-1)
    log_p = tt - lse_t
    kl = (torch.exp(log_p) * (log_p - (st - lse_s))).sum(-1)
    p = torch.exp(tt + (-lse_t))   # = exp(log_p), apart from the KL's (see above)
    if same_t:   # q_T = softmax(s): one exp serves both terms
        grad = (w_ce + w) * torch.exp(s - lse1) - w_ce * onehot - w * p
    else:
        grad = w_ce * (torch.exp(s - lse1) - onehot) + (w / inv_t) * (torch.exp(st + (-lse_s)) - p)
    return kl, nll, (grad * mf).to(out_dtype)


def _topk_ce(s, unlisted, y, m, log_tail, w, w_ce, inv_t, same_t: bool, out_dtype: torch.dtype):
    """The full-width part of a chunk against a top-k target (a cache's rows; TopK's tail-bucket
    rule): (logsumexp of s, of s/T, the KL's tail-bucket term p_tail (log p_tail - log q_tail) per
    row, and the gradient as it is off the listed ids: w_ce (softmax(s) - onehot(y)) +
    w T (1 - r) q_T, with r = p_tail / q_tail). The listed ids' k entries per row are done by the
    caller (gathers and one scatter: compiled, those made the chunk 2x slower than eager).
    unlisted (n, V) bool: the tokens outside the row's valid ids, whose student mass is summed
    directly (not 1 - sum(listed), which cancels when the listed ids hold nearly all of it). As in
    `_kd_ce`, q_T's exp is written apart for the tail's sum and for the gradient (one use each:
    no (n, V) fp32 buffer)."""
    s = s.float()
    lse1 = torch.logsumexp(s, dim=-1)
    st = s if same_t else s * inv_t
    lse_t = lse1 if same_t else torch.logsumexp(st, dim=-1)
    log_q_tail = torch.log(torch.where(unlisted, torch.exp(st - lse_t.unsqueeze(-1)), 0.0).sum(-1))
    tail_kl, grad = _tail_and_grad(s, st, lse1, lse_t, log_q_tail, y, m, log_tail, w, w_ce, inv_t, same_t)
    return lse1, lse_t, tail_kl, grad.to(out_dtype)


def _topk_ce_into(s, s_k, ok, y, m, log_tail, w, w_ce, inv_t, same_t: bool, out_dtype: torch.dtype):
    """`_topk_ce` for a chunk of logits that is spent after it, the gradient written over s, and
    no (n, V) mask: s comes with -inf at the row's valid listed ids (ok), whose logits s_k (n, k)
    come apart. The sums over s are then the tail's own (log q_tail = its log-sum-exp minus the
    whole row's, exact, no cancellation either), and the whole row's log-sum-exp joins in the
    listed ones. The gradient at the listed ids is the caller's to write, as in `_topk_ce`.
    -> (logsumexp of s, of s/T, tail-bucket KL rows) of the unmasked logits."""
    x = s.float()
    listed = torch.where(ok, s_k, float("-inf"))
    tail1 = torch.logsumexp(x, dim=-1)
    lse1 = torch.logaddexp(tail1, torch.logsumexp(listed, dim=-1))
    xt = x if same_t else x * inv_t
    if same_t:
        lse_t, log_q_tail = lse1, tail1 - lse1
    else:
        tail_t = torch.logsumexp(xt, dim=-1)
        lse_t = torch.logaddexp(tail_t, torch.logsumexp(listed * inv_t, dim=-1))
        log_q_tail = tail_t - lse_t
    tail_kl, grad = _tail_and_grad(x, xt, lse1, lse_t, log_q_tail, y, m, log_tail, w, w_ce, inv_t, same_t)
    s.copy_(grad)
    return lse1, lse_t, tail_kl


def _tail_and_grad(s, st, lse1, lse_t, log_q_tail, y, m, log_tail, w, w_ce, inv_t, same_t: bool):
    """The top-k kernels' common end: the tail-bucket KL rows, and the fp32 gradient off the listed ids."""
    tail_ok = torch.isfinite(log_tail) & torch.isfinite(log_q_tail)
    diff = torch.where(tail_ok, log_tail - log_q_tail, 0.0)
    tail_kl = torch.where(tail_ok, log_tail.exp() * diff, 0.0)
    c = ((w / inv_t) * (1.0 - torch.where(tail_ok, diff.exp(), 0.0))).unsqueeze(-1)   # w T (1 - r)
    onehot = (torch.arange(s.shape[-1], device=s.device) == y.unsqueeze(-1)).float()
    if same_t:   # q_T = softmax(s): one exp serves both terms
        grad = (w_ce + c) * torch.exp(s + (-lse1.unsqueeze(-1))) - w_ce * onehot
    else:
        grad = w_ce * (torch.exp(s - lse1.unsqueeze(-1)) - onehot) + c * torch.exp(st + (-lse_t.unsqueeze(-1)))
    return tail_kl, grad * m.unsqueeze(-1).float()


def _kd_ce_into(s, t, y, m, w, w_ce, inv_t, same_t: bool, out_dtype: torch.dtype):
    """`_kd_ce` with the gradient written over s (the chunk's logits, read for the last time in
    the same loop): no (n, V) buffer for it. -> (KD row sums, CE row sums)."""
    kl, nll, grad = _kd_ce(s, t, y, m, w, w_ce, inv_t, same_t, out_dtype)
    s.copy_(grad)
    return kl, nll


def _topk_terms(s, t: TopK, y0, valid, scalars, w, w_ce, temperature, out_dtype, into):
    """(loss, grad) of a chunk against a top-k target: the compiled full-width part, then the k
    listed entries per row in eager (n, k) ops, as `_sparse_kl` / `_sparse_grad_` define them.
    y0: the labels with 0 where not valid; scalars: w, w_ce, 1/T as the kernel takes them; into:
    see `chunk_terms`."""
    logp = t.logp.float()
    ok = torch.isfinite(logp)   # -inf: "no entry" (a shorter list): that token stays in the tail
    s_k = s.gather(-1, t.ids)                               # read before an `into` kernel writes over s
    s_y = s.gather(-1, y0.unsqueeze(-1)).squeeze(-1).float()
    rest = (y0, valid, t.log_tail.float(), *scalars, temperature == 1.0, out_dtype)
    if into:   # the listed ids out of s's sums (see `_topk_ce_into`)
        _put(s, t.ids, torch.where(ok, float("-inf"), s_k))
        out = _call("topk_into", s, s_k.float(), ok, *rest)
    else:
        unlisted = torch.ones(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, t.ids, ~ok)
        out = _call("topk", s, unlisted, *rest)
    if out is None:   # the call failed (a compile): under `into` s has its listed ids at -inf by now
        return REDO if into else None
    s_k = s_k.float()
    lse1, lse_t, tail_kl = out[:3]
    grad = s if into else out[3]
    lq_k = s_k * (1.0 / temperature) - lse_t.unsqueeze(-1)
    p_k = logp.exp()
    head = torch.where((p_k > 0) & torch.isfinite(lq_k), p_k * (logp - lq_k), 0.0).sum(-1)
    kl = torch.where(valid, head + tail_kl, 0.0)
    if not torch.isfinite(kl).all():
        return REDO if into else None
    nll = torch.where(valid, lse1 - s_y, 0.0)
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
REDO = "redo"   # chunk_terms: the kernel wrote over the logits, then gave the chunk back (see there)
_broken: str | None = None   # why the compiled kernel failed in this process (then it is not tried again)


def _kernel(name: str = "dense"):
    if name not in _compiled:
        fn = {"dense": _kd_ce, "topk": _topk_ce, "dense_into": _kd_ce_into, "topk_into": _topk_ce_into}[name]
        _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
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


def chunk_terms(s, targets, y, keep, w_ce, temperature, how, out_dtype, into=False, known=None):
    """(loss, grad in out_dtype) for a chunk the compiled kernel covers, else None (the caller
    runs the eager kernel). Covers: CE alone, or one soft forward-KL target (logits or TopK), with
    or without CE, over the same rows (keep == labelled rows, as in training).

    into=True (s a fresh chunk of logits, made for this call, in out_dtype): the gradient is
    written over s, which is returned as grad. A chunk the kernel gives back after it ran (a
    teacher that masks tokens with -inf), or a failed call, then returns REDO: s is spent, the
    caller makes the logits again for the eager kernel."""
    if _broken is not None or _get_current_dispatch_mode() is not None:   # a mode (a memory count) sees eager ops
        return None
    name, _ = how
    targets = [(t, w) for t, w in targets if w]
    if y is None or len(targets) > 1 or (targets and name != "forward_kl"):
        return None
    valid = y != IGNORE_INDEX
    if not (known.same_rows if known is not None else torch.equal(keep, valid)):
        return None
    if known is not None and any(known.masks):   # a teacher that masks tokens: the eager kernel's rule
        return None
    t, w = targets[0] if targets else (None, 0.0)
    if (not w and not w_ce) or not (t is None or torch.is_tensor(t) or isinstance(t, TopK)):
        return None
    y0 = torch.where(valid, y, 0)
    # tensors, not constants: a schedule changes them without a recompile
    scalars = [torch.tensor(float(v), dtype=torch.float32, device=s.device) for v in (w, w_ce, 1.0 / temperature)]
    if isinstance(t, TopK):
        return _topk_terms(s, t, y0, valid, scalars, w, w_ce, temperature, out_dtype, into)
    args = (t, y0, valid, *scalars, temperature == 1.0, out_dtype)
    out = _call("dense_into", s, *args) if into else _call("dense", s, *args)
    if out is None:   # the call failed: under `into`, s is not trusted any more
        return REDO if into else None
    kl, nll = out[:2]
    grad = s if into else out[2]
    loss = w_ce * torch.where(valid, nll, 0.0).sum()
    if kl is not None:
        kl = torch.where(valid, kl, 0.0)
        if known is None and not torch.isfinite(kl).all():   # a teacher that masks tokens (-inf): the eager
            return REDO if into else None                     # kernel's rule (with `known`: decided before)
        loss = loss + w * temperature * temperature * kl.sum()
    return loss, grad
