"""The general path (teacher mixtures and routing, per-token weights, several divergences at
once, term-by-term sums), and the hidden-state, attention and cross-tokenizer (ULD) losses."""
from __future__ import annotations

import math

import torch

from stillroom.losses.core import IGNORE_INDEX, TopK, _rows, _saved_grad, _target_chunk, auto_chunk_rows, on_support
from stillroom.losses.divergences import DIVERGENCES, _kl


# Everything above is the fast path for the common losses. The methods below (teacher mixtures and
# routing, per-token weights, several divergences at once, term-by-term reporting for balancing,
# cross-tokenizer ULD) go through one general chunked function: each chunk's loss is an ordinary
# autograd expression of that chunk's student logits, differentiated on the spot, so memory stays
# one chunk's (plus the (N, V) gradient buffer) and every formula reads like its paper.

class _AutogradChunked(torch.autograd.Function):
    """sum over row chunks [a, b) of fn(x, a, b), x = the chunk's student logits (n, V) in fp32.
    fn runs under autograd on that chunk alone and is differentiated at once; its gradient is
    written into one buffer and only scaled in backward. fn must not need other chunks."""

    @staticmethod
    def forward(ctx, student, fn, chunk):
        want = ctx.needs_input_grad[0]
        s2 = _rows(student)
        chunk = chunk or auto_chunk_rows(s2.shape[1], student.device)
        grad = torch.empty(s2.shape, dtype=student.dtype, device=student.device) if want else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a in range(0, s2.shape[0], chunk):
            b = min(a + chunk, s2.shape[0])
            with torch.enable_grad():
                x = s2[a:b].detach().float().requires_grad_(want)
                val = fn(x, a, b)
                if want:
                    grad[a:b] = (torch.autograd.grad(val, x)[0] if val.requires_grad else 0.0)
            total += val.detach()
        if want:
            ctx.save_for_backward(grad.view(student.shape))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        return _saved_grad(ctx, grad_out), None, None


TOKEN_WEIGHTS = {
    "none": "every position counts 1",
    "confidence": "the teacher's top-1 probability at the position (a sure teacher teaches more)",
    "entropy": "1 - H(teacher) / log V at the position (a low-entropy teacher teaches more)",
}


def token_weights(log_p: torch.Tensor, kind: str) -> torch.Tensor:
    """(n, V) teacher log-probs -> (n,) weights in [0, 1], no gradient (see TOKEN_WEIGHTS)."""
    if kind == "none":
        return log_p.new_ones(log_p.shape[0])
    p = log_p.exp()
    if kind == "confidence":
        return p.max(-1).values
    if kind == "entropy":
        if log_p.shape[-1] == 1:   # one token: certain (and log V = 0)
            return log_p.new_ones(log_p.shape[0])
        h = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
        return (1.0 - h / math.log(log_p.shape[-1])).clamp(0.0, 1.0)
    raise ValueError(f"token weight must be one of {sorted(TOKEN_WEIGHTS)}, got {kind!r}")


def _topk_dense_logp(t: TopK, log_q):
    """A TopK row block as a full (n, V) log-distribution: listed ids keep their log-probs and the
    tail mass is spread over the other ids in proportion to q (the student, detached) -- the same
    reading as the TopK tail rule, so forward KL against it has the tail-bucket gradient."""
    q = log_q.detach().exp()
    ids, logp = t.ids, t.logp.float()
    valid = torch.isfinite(logp)
    listed = torch.zeros_like(q).scatter_(-1, ids, valid.to(q.dtype))
    q_tail = (q * (1 - listed)).sum(-1, keepdim=True).clamp_min(1e-30)
    spread = torch.log(q.clamp_min(1e-30)) - torch.log(q_tail) + t.log_tail.float().unsqueeze(-1)
    out = torch.where(listed > 0, float("-inf"), spread)
    return out.scatter(-1, ids, torch.where(valid, logp, out.gather(-1, ids)))


def _topk_own_logp(t: TopK, V: int):
    """A TopK row block as the teacher's own full (n, V) log-distribution: listed ids keep their
    log-probs, the tail mass is spread evenly over the other ids (no student in it). What hard
    targets and token weights read: its argmax is the listed top-1 (`TopK.argmax`), since an even
    share of the tail never exceeds the smallest listed probability of a true top-k."""
    ids, logp = t.ids, t.logp.float()
    valid = torch.isfinite(logp)
    others = (V - valid.sum(-1, keepdim=True)).clamp_min(1).float()
    out = (t.log_tail.float().unsqueeze(-1) - others.log()).expand(*ids.shape[:-1], V).clone()
    return out.scatter_(-1, ids, torch.where(valid, logp, out.gather(-1, ids)))


def mixture_logp(parts) -> torch.Tensor:
    """log sum_k w_k p_k from [(log p_k (n, V), w_k (n,) or float)]: a mixture of distributions
    (not of logits). Weights are per row (routing: one-hot) or shared; rows must sum to 1."""
    stack, logw = [], []
    for lp, w in parts:
        w = torch.as_tensor(w, dtype=lp.dtype, device=lp.device).expand(lp.shape[0])
        stack.append(lp)
        logw.append(torch.log(w))
    lw = torch.stack(logw)[..., None]                     # (K, n, 1)
    x = torch.stack(stack) + lw                           # -inf where w_k = 0 or p_k = 0
    return torch.logsumexp(torch.where(torch.isneginf(lw), float("-inf"), x), dim=0)


TEACHER_TERMS = (*DIVERGENCES, "hard")


def check_terms(terms: dict):
    """A loss spec's names and weights: ce, hard or a divergence, each weight >= 0."""
    for name, w in terms.items():
        if name != "ce" and name not in TEACHER_TERMS:
            raise ValueError(f"unknown loss term {name!r}: use ce, hard or one of {sorted(DIVERGENCES)}")
        if w < 0:
            raise ValueError(f"term weights must be >= 0, got {name}={w}")


def general_loss(student_logits, teachers, labels, terms: dict, temperature=1.0, beta=0.5,
                 token_weight="none", kd_scale=1.0, parts: dict | None = None, chunk=None):
    """sum_term w_term * term, summed over positions with a label, where the terms are

        ce:            -log softmax(s)[label]
        <divergence>:  kd_scale * T^2 * tw * D(p, softmax(s / T))   (any name in DIVERGENCES)
        hard:          kd_scale * tw * -log softmax(s)[argmax p]

    p = sum_k w_k p_k is the mixture of the teachers' distributions at temperature T: `teachers`
    is [(logits (..., V) or TopK, weight)], weight a float or a (...) tensor per position (routing:
    one-hot per example); at each position the weights must sum to 1. tw is the per-token weight
    (TOKEN_WEIGHTS) of p. `parts`, if given, has the raw (unweighted, unscaled) sums of each
    term, detached: what automatic balancing reads."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_terms(terms)
    teacher_terms = {n: w for n, w in terms.items() if n != "ce" and w}
    if teacher_terms and not teachers:
        raise ValueError(f"terms {sorted(teacher_terms)} need a teacher")
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    if labels.shape != lead:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}")
    rows = []
    for t, w in teachers:
        if t.shape[:len(lead)] != lead or (not isinstance(t, TopK) and t.shape[-1] != V):
            raise ValueError(f"a teacher of shape {tuple(t.shape)} does not match the student's logits "
                             f"{tuple(student_logits.shape)}; align vocabularies first")
        rows.append((t.rows() if isinstance(t, TopK) else _rows(t.detach()),
                     w.reshape(-1).float() if torch.is_tensor(w) else float(w)))
    y = labels.reshape(-1)
    T = float(temperature)
    sums = {n: torch.zeros((), dtype=torch.float64, device=student_logits.device) for n in terms}

    def fn(x, a, b):
        yy = y[a:b]
        valid = yy != IGNORE_INDEX
        total = x.new_zeros(())
        if "ce" in terms:
            nll = -torch.log_softmax(x, -1).gather(-1, torch.where(valid, yy, 0)[:, None]).squeeze(-1)
            ce = torch.where(valid, nll, 0.0).sum()
            sums["ce"] += ce.detach()
            total = total + terms["ce"] * ce
        if not teacher_terms:
            return total
        log_qT = torch.log_softmax(x * (1.0 / T), -1)
        comps, own = [], []   # the targets the divergences compare with; the teachers' own distributions
        for t, w in rows:
            tc = _target_chunk(t, a, b)
            ww = w[a:b] if torch.is_tensor(w) else w
            if isinstance(tc, TopK):
                comps.append((_topk_dense_logp(tc, log_qT), ww))
                own.append((_topk_own_logp(tc, V), ww))
            else:
                comps.append((torch.log_softmax(tc.float() * (1.0 / T), -1), ww))
                own.append(comps[-1])
        mix = lambda c: c[0][0] if len(c) == 1 and not torch.is_tensor(c[0][1]) else mixture_logp(c)  # noqa: E731
        log_p = mix(comps).detach()
        # Hard targets and token weights come from the teachers alone (a TopK's tail spread
        # evenly), never from a tail rebuilt with the student's probabilities.
        log_t = mix(own).detach() if any(isinstance(t, TopK) for t, _ in rows) else log_p
        tw = token_weights(log_t, token_weight) * valid
        lq = log_qT if torch.isfinite(log_p).all() else on_support(x, log_p, 1.0 / T)   # the student on the teacher's support
        for name, w in teacher_terms.items():
            if name == "hard":
                top = log_t.argmax(-1, keepdim=True)
                r = -torch.log_softmax(x, -1).gather(-1, top).squeeze(-1)
                term = (tw * torch.where(valid, r, 0.0)).sum()
            else:
                r = DIVERGENCES[name][0](lq, log_p, beta)
                term = T * T * (tw * torch.where(valid, r, 0.0)).sum()
            sums[name] += term.detach()
            total = total + kd_scale * w * term
        return total

    out = _AutogradChunked.apply(student_logits, fn, chunk)
    if parts is not None:   # added to what it holds: one dict sums a step's micro-batches
        for n, v in sums.items():
            parts[n] = parts.get(n, 0.0) + float(v)
    return out


# ------------------------------------------------------------------------ intermediate layers

def hidden_loss(student_hidden, teacher_hidden, mask, kind="cosine", proj=None):
    """Sum over masked positions of a hidden-state distance, per position:
    cosine: 1 - cos(proj(h_s), h_t) (DistilBERT); mse: mean over features of (proj(h_s) - h_t)^2
    (TinyBERT). proj maps the student's width to the teacher's (a learned linear map)."""
    h = student_hidden.float() if proj is None else proj(student_hidden.float())
    t = teacher_hidden.detach().float()
    if h.shape != t.shape:
        raise ValueError(f"student hidden {tuple(h.shape)} and teacher hidden {tuple(t.shape)} differ: "
                         "a projection is needed")
    if kind == "cosine":
        per = 1.0 - torch.nn.functional.cosine_similarity(h, t, dim=-1, eps=1e-8)
    elif kind == "mse":
        per = (h - t).pow(2).mean(-1)
    else:
        raise ValueError(f"hidden loss kind must be cosine or mse, got {kind!r}")
    return torch.where(mask.bool(), per, 0.0).sum()


def attention_loss(student_attn, teacher_attn, mask):
    """Attention transfer: sum over masked query positions of KL(a_t || a_s) between the
    head-averaged attention distributions over keys (works across different head counts).
    student_attn (B, Hs, S, S), teacher_attn (B, Ht, S, S): softmax-ed attention probabilities."""
    s = student_attn.float().mean(1)
    t = teacher_attn.detach().float().mean(1)
    log_s = torch.log(s.clamp_min(1e-12))
    log_t = torch.log(t.clamp_min(1e-12))
    per = torch.where(t > 0, t * (log_t - log_s), 0.0).sum(-1)
    return torch.where(mask.bool(), per, 0.0).sum()


# ------------------------------------------------------------------------ cross-tokenizer

def uld_loss(student_rows, teacher_rows, temperature=1.0, match=None, match_weight=0.0, chunk=None):
    """Universal Logit Distillation (Boizard et al. 2024) between aligned positions of a student and
    a teacher with different vocabularies, summed over rows:

        sum_i |sort(q)_i - sort(p)_i|      (both sorted descending; the shorter padded with zeros)

    the Wasserstein-1 distance between the two distributions with tokens ranked by probability
    (T^2-scaled like the other KD terms). With match = (student_ids, teacher_ids), tokens whose
    strings both vocabularies share, match_weight adds T^2 KL(p_shared || q_shared) between both
    distributions restricted to those tokens and renormalized there (exact-match alignment)."""
    if student_rows.shape[0] != teacher_rows.shape[0]:
        raise ValueError("student and teacher rows must be aligned one to one")
    T = float(temperature)
    Vs, Vt = student_rows.shape[-1], teacher_rows.shape[-1]
    k = min(Vs, Vt)
    t_rows = teacher_rows.detach()
    if match is not None:
        s_ids, t_ids = match

    def fn(x, a, b):
        q = torch.softmax(x * (1.0 / T), -1)
        lp_full = torch.log_softmax(t_rows[a:b].float() * (1.0 / T), -1)
        p = lp_full.exp()
        qs = q.sort(-1, descending=True).values
        ps = p.sort(-1, descending=True).values
        # beyond the shorter vocabulary one side is 0: |x - 0| = x
        w = (qs[:, :k] - ps[:, :k]).abs().sum() + qs[:, k:].sum() + ps[:, k:].sum()
        total = T * T * w
        if match is not None and match_weight:
            lq = torch.log_softmax(x.index_select(-1, s_ids) * (1.0 / T), -1)
            lp = torch.log_softmax(t_rows[a:b].float().index_select(-1, t_ids) * (1.0 / T), -1)
            total = total + match_weight * T * T * _kl(lp, lq).sum()
        return total

    return _AutogradChunked.apply(student_rows, fn, chunk or max(1, auto_chunk_rows(max(Vs, Vt), student_rows.device) // 2))
