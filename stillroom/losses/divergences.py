"""Divergences between the teacher's and the student's distributions, as rows of (n, V)
log-probabilities, and the autograd-per-chunk path for those without a hand-written gradient."""
from __future__ import annotations

import math

import torch

from stillroom.losses.core import IGNORE_INDEX, TopK, _masked_kl_rows, on_support


# Rows of D(p, q) from log-probabilities: log_q the student's, log_p the teacher's, both (n, V) at
# the loss's temperature. Terms where the weighting distribution is 0 count 0; -inf is masked.

def _kl(log_a, log_b):
    """KL(a || b) rows (a is the reference)."""
    return _masked_kl_rows(log_b, log_a)


def _log_mix(log_a, log_b, w):
    """log(w a + (1 - w) b), 0 < w < 1, stably; -inf where both are 0 (with a zero gradient there,
    where logaddexp(-inf, -inf) would give NaN)."""
    a, b = log_a + math.log(w), log_b + math.log1p(-w)
    none = torch.isneginf(a) & torch.isneginf(b)
    return torch.where(none, float("-inf"), torch.logaddexp(torch.where(none, 0.0, a), torch.where(none, 0.0, b)))


def _jsd_rows(log_q, log_p, beta):
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)           # m = beta p + (1 - beta) q
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _skew_kl_rows(log_q, log_p, a):
    return _kl(log_p, log_q if a == 0.0 else _log_mix(log_p, log_q, a)) if a < 1.0 else log_q.new_zeros(log_q.shape[0])


def _skew_rkl_rows(log_q, log_p, a):
    return _skew_kl_rows(log_p, log_q, a)   # KL(q || a q + (1 - a) p): the roles swapped


DIVERGENCES = {
    # name: (rows function of (log_q, log_p, param), what it is)
    "forward_kl": (lambda lq, lp, _: _kl(lp, lq), "KL(teacher || student): mode-covering (Hinton et al. 2015)"),
    "reverse_kl": (lambda lq, lp, _: _kl(lq, lp), "KL(student || teacher): mode-seeking (MiniLLM, Gu et al. 2024)"),
    "jsd": (_jsd_rows, "generalized JSD(beta) of GKD (Agarwal et al. 2024); beta 0 = forward KL, 1 = reverse KL"),
    "skew_kl": (_skew_kl_rows, "KL(p || a p + (1 - a) q), a = beta (DistiLLM, Ko et al. 2024); a 0 = forward KL"),
    "skew_rkl": (_skew_rkl_rows, "KL(q || a q + (1 - a) p), a = beta (DistiLLM); a 0 = reverse KL"),
    "tv": (lambda lq, lp, _: 0.5 * (lq.exp() - lp.exp()).abs().sum(-1), "total variation 1/2 sum |p - q|"),
}


def _how(kind, divergence, beta, targets):
    """(kind, divergence, beta) -> the loss's mode, checked: ("hard", None) or (divergence, beta)."""
    if kind not in ("soft", "hard"):
        raise ValueError(f"kind must be 'soft' or 'hard', got {kind!r}")
    if kind == "hard":
        return ("hard", None)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if divergence != "forward_kl" and any(isinstance(t, TopK) for t, w in targets if w):
        raise ValueError(f"divergence={divergence} needs the teacher's full distribution; a top-k target "
                         "supports forward_kl only")
    return (divergence, float(beta))


def _divergence_chunk(s, targets, y, keep, w_ce, T, name, param, want_grad, masks=None):
    """One chunk of sum_j w_j T^2 D(p_j, q) + w_ce CE for a divergence without a hand-written
    gradient: autograd runs on this chunk alone (recomputed here, nothing kept), so memory stays
    that of one chunk. Returns (loss, grad (n, V) fp32 or None), like _chunk_terms.

    Tokens a target masks (-inf logits) are outside its support: the student is compared on the
    rest, renormalized there. Dropping those terms instead (as forward KL may, since they weigh 0
    under the teacher) would let reverse-direction divergences go negative. masks: per target,
    whether it may mask tokens (kernel.Known: decided once per call, no host sync here); None asks
    the device per chunk."""
    rows_fn = DIVERGENCES[name][0]
    with torch.enable_grad():
        x = s.detach().requires_grad_(want_grad)
        log_q = torch.log_softmax(x * (1.0 / T), dim=-1)
        total = x.new_zeros(())
        for (t, w), m in zip(targets, masks or [None] * len(targets)):
            log_p = torch.log_softmax(t.float() * (1.0 / T), dim=-1)
            if m is None:
                lq = log_q if torch.isfinite(log_p).all() else on_support(x, log_p, 1.0 / T)
            else:   # the chunk picks the renormalized student on the device where the target masks tokens
                lq = torch.where(torch.isfinite(log_p).all(), log_q, on_support(x, log_p, 1.0 / T)) if m else log_q
            total = total + w * T * T * torch.where(keep, rows_fn(lq, log_p, param), 0.0).sum()
        if w_ce and y is not None:
            valid = y != IGNORE_INDEX
            nll = -torch.log_softmax(x, dim=-1).gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
            total = total + w_ce * torch.where(valid, nll, 0.0).sum()
        grad = None
        if want_grad:   # (a term that is identically 0, like skew 1, has no graph)
            grad = torch.autograd.grad(total, x)[0] if total.requires_grad else torch.zeros_like(x)
    return total.detach(), grad
