"""The hot chunk of the closed-form loss, compiled: one dense soft target (forward KL at T) and CE,
or CE alone, with the gradient, as `torch.compile` (Inductor) fuses them: the eager kernel makes
about ten passes over each (rows, V) chunk (log-softmaxes, exps, the KL's product, the gradient's
sum, the casts); the compiled one fuses them into a few loops. Measured on an AVX512-BF16 CPU
(`bench/peers.py`, rows lean/live and lean/live eager): the whole live KD step at 49k vocab in
0.92x the time (0.78x under glibc's default allocator). Same values as the eager
kernel within fp32 rounding (tests pin it). Every other case stays on the eager kernel: hard
labels, other divergences, several targets, a teacher that masks tokens with -inf, and a top-k
cache's rows (compiled, their scatters made that chunk 2x slower than eager: measured, dropped).
On when `loss.compile` says so (`wanted`)."""
from __future__ import annotations

import logging

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .core import IGNORE_INDEX

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


VOCAB_MIN = 8192   # auto compiles from this vocabulary up (see `wanted`)


def wanted(setting, vocab: int, device) -> bool:
    """loss.compile -> whether a loss of this vocabulary on this device runs compiled. true/false as
    said; auto: on a CPU at a vocabulary of VOCAB_MIN or more. Below it a step's loss takes
    milliseconds either way and the compile's seconds do not pay back in a short run (the kernel
    itself is faster from 1k up); on a GPU it is not measured yet."""
    if setting != "auto":
        return bool(setting)
    return torch.device(device).type == "cpu" and vocab >= VOCAB_MIN


_compiled = None
_broken: str | None = None   # why the compiled kernel failed in this process (then it is not tried again)


def _kernel():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_kd_ce, dynamic=True, fullgraph=True)
    return _compiled


def chunk_terms(s, targets, y, keep, w_ce, temperature, how, out_dtype):
    """(loss, grad in out_dtype) for a chunk the compiled kernel covers, else None (the caller
    runs the eager kernel). Covers: CE alone, or one soft forward-KL target given as logits, with
    or without CE, over the same rows (keep == labelled rows, as in training)."""
    global _broken
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
    if (not w and not w_ce) or not (t is None or torch.is_tensor(t)):   # a top-k cache's rows: eager
        return None                          # (compiled, its scatters made the chunk 2x slower: dropped)
    f = lambda v: torch.tensor(float(v), dtype=torch.float32, device=s.device)  # noqa: E731
    rest = (torch.where(valid, y, 0), valid, f(w), f(w_ce), f(1.0 / temperature), temperature == 1.0, out_dtype)
    try:
        kl, nll, grad = _kernel()(s, t, *rest)
    except Exception as e:   # no C++ compiler, an Inductor failure: the eager kernel, said once
        _broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("loss.compile: torch.compile of the loss kernel failed (%s); the eager kernel runs "
                    "(loss.compile=false hides this)", _broken)
        return None
    loss = w_ce * torch.where(valid, nll, 0.0).sum()
    if kl is not None:
        kl = torch.where(valid, kl, 0.0)
        if not torch.isfinite(kl).all():   # a teacher that masks tokens (-inf): the eager kernel's rule
            return None
        loss = loss + w * temperature * temperature * kl.sum()
    return loss, grad
