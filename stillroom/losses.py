"""Distillation losses: pure functions of logits, fp32 inside, sum-reduced over unmasked positions.

Every loss here returns a *sum* over valid positions; the training loop divides once per optimizer
step by the global number of valid tokens, so gradient accumulation and several processes give the
same gradient as one big batch.

Shapes: logits are (..., V) (usually (batch, seq, V)); `mask` is (...) bool, True = keep; `labels`
are (...) int64 with IGNORE_INDEX for positions to skip. Position i of the logits predicts labels[i]:
callers shift labels left by one (see `shift_labels`), never the logits, so no (B, S, V) copy is made.

Memory and time: the losses are computed in chunks of rows along the flattened sequence inside one
autograd function. Each chunk's loss and gradient come from one pass (the gradient of every term
here has a closed form), written into one (B, S, V) buffer in the logits' dtype; nothing else of
full size is kept, so the loss never holds full-size fp32 copies of both models' distributions (the
textbook version holds several), and backward costs one multiply.

Conventions (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): both
distributions are divided by the temperature T and the KD term is scaled by T^2, which keeps its
gradient magnitude independent of T. -inf logits are masked vocabulary entries, with one rule on
every path (fast, lean, general, every divergence, the evaluation's KL; see `on_support`): tokens
the teacher masks are outside its distribution, and the student is compared with it on the rest,
renormalized there; terms where the student gives -inf to a token the teacher likes are dropped
rather than made infinite (as torchtune and TRL do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23   # logits per chunk when none is given: 32 MB of fp32 per full-size buffer


def auto_chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary: a power of two near CHUNK_ELEMENTS / vocab (128 rows at
    49k, 32 at 262k), so the loss's working memory stays the same whatever the vocabulary, and the
    chunks stay thick enough for the head's matmuls (measured: 64 rows at 49k is ~7% slower)."""
    return 1 << max(4, min(10, (CHUNK_ELEMENTS // max(vocab, 1)).bit_length() - 1))


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) labels -> (B, S) targets where position i holds labels[i + 1]; the last is ignored."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (N, V), a view whenever the leading dims allow it (also after slicing V)."""
    return x.reshape(-1, x.shape[-1])


def _masked_kl_rows(log_q, log_p):
    """KL(p || q) rows with -inf logits masked: 0 where p == 0 (0 log 0), dropped where log q = -inf."""
    p = log_p.exp()
    diff = torch.where((p > 0) & torch.isfinite(log_q), log_p - log_q, 0.0)
    return (p * diff).sum(-1)


def on_support(log_q, log_p):
    """log q renormalized on the support of p (the tokens p does not mask with -inf), -inf elsewhere.

    The one rule for masked teacher tokens on every path (fast, lean, general, every divergence,
    the evaluation): a token the teacher masks is outside its distribution, so the student is
    compared with it on the rest, renormalized there. Rows where p masks nothing are unchanged."""
    inside = torch.isfinite(log_p)
    lq = torch.where(inside, log_q, float("-inf"))
    return lq - torch.logsumexp(lq, dim=-1, keepdim=True)


def support_kl_rows(log_q, log_p):
    """KL(p || q restricted to p's support and renormalized) rows (see `on_support`)."""
    return _masked_kl_rows(on_support(log_q, log_p), log_p)


def _rowdot(a, b):
    """(n, V), (n, V) -> (n,): per-row dot products as one batched matmul (no (n, V) temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _zero_rows(g, keep):
    """Zero the gradient rows not kept; indexes the few dropped rows instead of a full pass."""
    drop = (~keep).nonzero().view(-1)
    if drop.numel():
        g[drop] = 0.0
    return g


def _nll_terms(log_q, target, rows, weight, want_grad, consume):
    """weight * sum over `rows` of -log_q[target], and its gradient weight * (softmax - onehot).
    consume=True turns log_q into the gradient in place (its last use)."""
    nll = -log_q.gather(-1, target).squeeze(-1)
    loss = weight * torch.where(rows, nll, 0.0).sum()
    if not want_grad:
        return loss, None
    g = (log_q.exp_() if consume else log_q.exp()).mul_(weight)
    g.scatter_add_(-1, target, torch.full_like(nll, -weight).unsqueeze(-1))
    return loss, _zero_rows(g, rows)


@dataclass
class TopK:
    """A sparse target distribution: for each position, the k most likely token ids, their
    log-probs (at the loss's temperature), and the log of the mass outside them (-inf: none).

    Rule for the missing mass (a "tail bucket"): the target is compared with the student on k + 1
    outcomes -- each of the k tokens, and "any other token" -- so
        KL = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail),
    with q_tail the student's own mass outside the k ids. Equivalently, the tail mass is spread over
    the other tokens in proportion to the student's own probabilities. Nothing is invented about
    the tail, and with k = V (p_tail = 0) it is exactly the dense KL. A row may hold fewer than k
    entries (an API's top-20, say): pad it with distinct unused ids and log-prob -inf ("no entry").
    """
    ids: torch.Tensor       # (..., k) int64
    logp: torch.Tensor      # (..., k) float
    log_tail: torch.Tensor  # (...)    float

    @property
    def shape(self):
        return self.ids.shape[:-1]

    def rows(self) -> "TopK":
        k = self.ids.shape[-1]
        return TopK(self.ids.reshape(-1, k), self.logp.reshape(-1, k), self.log_tail.reshape(-1))

    def chunk(self, a, b) -> "TopK":
        return TopK(self.ids[a:b], self.logp[a:b], self.log_tail[a:b])

    def select(self, idx) -> "TopK":
        r = self.rows()
        return TopK(r.ids.index_select(0, idx), r.logp.index_select(0, idx), r.log_tail.index_select(0, idx))

    def argmax(self) -> torch.Tensor:
        return self.ids.gather(-1, self.logp.argmax(-1, keepdim=True))


@dataclass
class Head:
    """A target given as final hidden states and the linear head that turns them into logits:
    logits = hidden @ weight.T (+ bias), computed chunk by chunk inside the loss, so the (rows, V)
    logits never exist in full (the teacher's side of the lean path)."""
    hidden: torch.Tensor                 # (..., H)
    weight: torch.Tensor                 # (V, H)
    bias: torch.Tensor | None = None     # (V,)

    @property
    def shape(self):
        return self.hidden.shape[:-1]

    def rows(self) -> "Head":
        return Head(self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.bias)

    def select(self, idx) -> "Head":
        return Head(self.rows().hidden.index_select(0, idx), self.weight, self.bias)

    def chunk(self, a, b) -> torch.Tensor:
        return _linear(self.hidden[a:b], self.weight, self.bias)


def _linear(h, weight, bias):
    return torch.nn.functional.linear(h, weight, bias)


def _target_rows(t):
    return t.rows() if isinstance(t, (TopK, Head)) else _rows(t)


def _target_chunk(t, a, b):
    return t.chunk(a, b) if isinstance(t, (TopK, Head)) else t[a:b]


def topk_targets(logits, k, temperature=1.0, chunk=None) -> TopK:
    """The top-k of softmax(logits / T) as a TopK target, computed chunk by chunk (no (B, S, V)
    fp32 copy). k >= V keeps everything (the tail is empty)."""
    lead, V = logits.shape[:-1], logits.shape[-1]
    k = min(k, V)
    chunk = chunk or auto_chunk_rows(V)
    x = _rows(logits.detach())
    ids = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    logp = torch.empty(x.shape[0], k, dtype=torch.float32, device=x.device)
    tail = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    with torch.no_grad():
        for a in range(0, x.shape[0], chunk):
            lp = torch.log_softmax(x[a:a + chunk].float() * (1.0 / temperature), dim=-1)
            v, i = lp.topk(k, dim=-1)
            ids[a:a + chunk], logp[a:a + chunk] = i, v
            tail[a:a + chunk] = torch.logsumexp(lp.scatter_(-1, i, float("-inf")), dim=-1)
    return TopK(ids.view(*lead, k), logp.view(*lead, k), tail.view(lead))


def _dense_kl(log_q, t, T, want_grad):
    """KL(softmax(t/T) || q) rows, and what the gradient subtracts from q: the target
    probabilities p, or, where the teacher masks tokens (-inf), p + q - q' with q' the student
    renormalized on the teacher's support (`on_support`), so that q - that = q' - p, the gradient of
    the renormalized KL (the one rule every path follows)."""
    log_p = torch.log_softmax(t.float() if T == 1.0 else t.float() * (1.0 / T), dim=-1)
    p = log_p.exp()
    # KL rows = sum_v p (log p - log q); -inf logits give NaN/inf here, caught per row below.
    kl = _rowdot(p, log_p.sub_(log_q))
    if not torch.isfinite(kl).all():  # log_p was consumed above: recompute it for the masked path
        log_p = torch.log_softmax(t.float() * (1.0 / T), dim=-1)
        lq = on_support(log_q, log_p)
        kl = _masked_kl_rows(lq, log_p)
        if want_grad:
            p = p.add_(log_q.exp()).sub_(lq.exp())
    return kl, (p if want_grad else None)


def _sparse_kl(log_q, q, t: TopK):
    """Tail-bucket KL (see TopK) rows, and what its gradient needs: (kl, (r, p_k, valid)).

    q = exp(log_q) is passed in (shared by every target of the chunk) and left unchanged. The
    student's mass outside the listed ids is summed directly (the listed entries zeroed in place,
    then restored), not as 1 - sum(listed), which would cancel badly when the listed tokens hold
    nearly all of it. An entry with log-prob -inf is "no entry" (a row with fewer than k): its
    token stays in the tail. d KL / d (s/T) = q - p~, with p~ = p_k on the listed ids and
    r * q elsewhere, r = p_tail / q_tail."""
    ids = t.ids
    logp = t.logp.float()
    log_tail = t.log_tail.float()
    valid = torch.isfinite(logp)
    lq_k = log_q.gather(-1, ids)
    q_k = q.gather(-1, ids)
    q.scatter_(-1, ids, torch.where(valid, 0.0, q_k))
    log_q_tail = torch.log(q.sum(-1))
    q.scatter_(-1, ids, q_k)
    p_k = logp.exp()
    tail_ok = torch.isfinite(log_tail) & torch.isfinite(log_q_tail)
    head = torch.where((p_k > 0) & torch.isfinite(lq_k), p_k * (logp - lq_k), 0.0).sum(-1)
    diff = torch.where(tail_ok, log_tail - log_q_tail, 0.0)
    kl = head + torch.where(tail_ok, log_tail.exp() * diff, 0.0)
    r = torch.where(tail_ok, diff.exp(), 0.0)
    return kl, (r, p_k, valid)


def _p_tilde(q, t: TopK, stats):
    """The effective target of a TopK (full size, new memory)."""
    r, p_k, valid = stats
    p = q * r.unsqueeze(-1)
    return p.scatter_(-1, t.ids, torch.where(valid, p_k, p.gather(-1, t.ids)))


def _sparse_grad_(q, t: TopK, stats, scale):
    """scale * (q - p~), written into q (its last use)."""
    r, p_k, valid = stats
    q_k = q.gather(-1, t.ids)
    q.mul_(((1.0 - r) * scale).unsqueeze(-1))
    return q.scatter_(-1, t.ids, torch.where(valid, (q_k - p_k) * scale, q.gather(-1, t.ids)))


# ------------------------------------------------------------------------ other divergences
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


def _divergence_chunk(s, targets, y, keep, w_ce, T, name, param, want_grad):
    """One chunk of sum_j w_j T^2 D(p_j, q) + w_ce CE for a divergence without a hand-written
    gradient: autograd runs on this chunk alone (recomputed here, nothing kept), so memory stays
    that of one chunk. Returns (loss, grad (n, V) fp32 or None), like _chunk_terms.

    Tokens a target masks (-inf logits) are outside its support: the student is compared on the
    rest, renormalized there. Dropping those terms instead (as forward KL may, since they weigh 0
    under the teacher) would let reverse-direction divergences go negative."""
    rows_fn = DIVERGENCES[name][0]
    with torch.enable_grad():
        x = s.detach().requires_grad_(want_grad)
        log_q = torch.log_softmax(x * (1.0 / T), dim=-1)
        total = x.new_zeros(())
        for t, w in targets:
            t = t.float()
            lq = log_q
            if not torch.isfinite(t).all():
                lq = torch.log_softmax(torch.where(torch.isfinite(t), x, float("-inf")) * (1.0 / T), dim=-1)
            log_p = torch.log_softmax(t * (1.0 / T), dim=-1)
            total = total + w * T * T * torch.where(keep, rows_fn(lq, log_p, param), 0.0).sum()
        if w_ce and y is not None:
            valid = y != IGNORE_INDEX
            nll = -torch.log_softmax(x, dim=-1).gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
            total = total + w_ce * torch.where(valid, nll, 0.0).sum()
        grad = None
        if want_grad:   # (a term that is identically 0, like skew 1, has no graph)
            grad = torch.autograd.grad(total, x)[0] if total.requires_grad else torch.zeros_like(x)
    return total.detach(), grad


def scheduled(start: float, end: float | None, step: int, total: int, kind: str = "linear") -> float:
    """A value moving from `start` (step 0) to `end` (step total - 1): constant (end None or
    kind "constant"), linear, or cosine (half a cosine: slow at both ends)."""
    if end is None or kind == "constant" or total <= 1:
        return float(start)
    x = min(max(step / (total - 1), 0.0), 1.0)
    if kind == "cosine":
        x = 0.5 * (1 - math.cos(math.pi * x))
    elif kind != "linear":
        raise ValueError(f"schedule must be constant, linear or cosine, got {kind!r}")
    return float(start + (end - start) * x)


def _chunk_terms(s, targets, y, keep, w_ce, temperature, how, want_grad):
    """Loss sum and d loss / d s for one chunk of rows, with as few full passes as we can.

    s: (n, V) student logits; targets: [(dense (n, V) logits or TopK rows, weight)];
    y: (n,) labels or None; keep: (n,) bool rows that count for the KD terms (CE rows are
    y != IGNORE_INDEX). Gradients in closed form: d/ds [T^2 KL(p || softmax(s/T))] = T (q - p)
    with q = softmax(s/T), so for a weighted sum of targets it is T (sum_j w_j q - sum_j w_j p_j);
    d/ds CE(y) = softmax(s) - onehot(y). Returns (loss, grad (n, V) fp32 or None).
    """
    s = s.float()
    loss = s.new_zeros(())
    targets = [(t, w) for t, w in targets if w]
    use_ce = bool(w_ce) and y is not None
    name, param = how
    hard = name == "hard"
    if targets and name not in ("hard", "forward_kl"):   # another divergence: autograd per chunk
        return _divergence_chunk(s, targets, y, keep, w_ce, temperature, name, param, want_grad)
    soft = bool(targets) and not hard
    T = temperature if soft else 1.0
    log_q = torch.log_softmax(s if T == 1.0 else s * (1.0 / T), dim=-1)   # log softmax(s / T)
    log_q1 = log_q if T == 1.0 else None                                    # log softmax(s)
    grad = None
    valid = None if y is None else y != IGNORE_INDEX
    # At T = 1 the CE gradient, softmax(s) - onehot(y), shares q with the KD gradient: fold it in
    # (one exp pass fewer) when both count the same rows, as in training (keep == labelled rows).
    fuse_ce = (soft and use_ce and want_grad and T == 1.0 and torch.equal(keep, valid)
               and not (len(targets) == 1 and isinstance(targets[0][0], TopK)))

    if soft:
        single = len(targets) == 1
        q = log_q.exp() if want_grad or any(isinstance(t, TopK) for t, _ in targets) else None
        acc, w_sum = None, 0.0  # acc = sum_j w_j p_j (just p_1 for a single target)
        for t, w in targets:
            sparse = isinstance(t, TopK)
            kl, p = _sparse_kl(log_q, q, t) if sparse else _dense_kl(log_q, t, T, want_grad)
            loss = loss + w * T * T * torch.where(keep, kl, 0.0).sum()
            w_sum += w
            if want_grad and single and sparse:      # the cached-teacher path: no full-size extras
                grad = _sparse_grad_(q, t, p, w * T)
            elif want_grad:
                p = _p_tilde(q, t, p) if sparse else p
                p = p if single else p.mul_(w)
                acc = p if acc is None else acc.add_(p)
            del p
        if want_grad and grad is None and fuse_ce:   # T = 1: (w + w_ce) q - sum_j w_j p_j - w_ce onehot
            grad = (q.mul_(w_sum + w_ce).sub_(acc, alpha=targets[0][1]) if single
                    else q.mul_(w_sum + w_ce).sub_(acc))
            y_safe = torch.where(valid, y, 0).unsqueeze(-1)
            grad.scatter_add_(-1, y_safe, torch.full_like(y_safe, -w_ce, dtype=grad.dtype))
        elif want_grad and grad is None:
            grad = q.sub_(acc).mul_(targets[0][1] * T) if single else q.mul_(w_sum).sub_(acc).mul_(T)
        if want_grad:
            grad = _zero_rows(grad, keep)
        del acc, q
    else:
        # Hard labels: CE against each target's argmax token at each position.
        # log_q is still needed by the CE term when both run at T = 1: not consumed here.
        for t, w in targets:
            top = t.argmax() if isinstance(t, TopK) else t.argmax(dim=-1, keepdim=True)
            part, g = _nll_terms(log_q, top, keep, w, want_grad, consume=False)
            loss = loss + part
            if want_grad:
                grad = g if grad is None else grad.add_(g)

    if use_ce:
        y_safe = torch.where(valid, y, 0).unsqueeze(-1)
        if log_q1 is None:
            log_q1 = torch.log_softmax(s, dim=-1)
        part, g = _nll_terms(log_q1, y_safe, valid, w_ce, want_grad and not fuse_ce, consume=True)
        loss = loss + part
        if g is not None:
            grad = g if grad is None else grad.add_(g)
    if want_grad and grad is None:
        grad = torch.zeros_like(s)
    return loss, grad


def _saved_grad(ctx, grad_out):
    """The gradient a chunked loss saved in forward, scaled in place (the buffer is ours alone: no
    full-size copy), once."""
    if getattr(ctx, "used", False):
        raise RuntimeError("stillroom losses support one backward per forward (no retain_graph reuse)")
    ctx.used = True
    (grad,) = ctx.saved_tensors
    return grad.mul_(grad_out)


class _ChunkedLoss(torch.autograd.Function):
    """sum_j w_j KD(student, target_j) + w_ce * CE(student, labels), summed, chunked over rows.

    The forward computes each chunk's loss and gradient together (one pass over the logits) and
    writes the gradient into one buffer in the logits' dtype -- or, with `inplace`, into the
    student logits themselves, which are dead after the loss in a training step (as Liger-Kernel
    does); the backward only scales it. Only the student receives a gradient: the targets are
    passed inside a tuple, so autograd does not even see them (detached by construction).
    """

    @staticmethod
    def forward(ctx, student, targets, labels, keep, w_ce, temperature, how, chunk, inplace):
        want_grad = ctx.needs_input_grad[0]
        s2 = _rows(student)
        chunk = chunk or auto_chunk_rows(s2.shape[1])
        t2 = [(_target_rows(t), w) for t, w in targets]
        y = labels.reshape(-1) if labels is not None else None
        k = keep.reshape(-1)
        grad = None
        if want_grad:
            grad = s2 if inplace else torch.empty(s2.shape, dtype=student.dtype, device=student.device)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a in range(0, s2.shape[0], chunk):
            b = a + chunk
            part, g = _chunk_terms(s2[a:b], [(_target_chunk(t, a, b), w) for t, w in t2],
                                   None if y is None else y[a:b], k[a:b],
                                   w_ce, temperature, how, want_grad)
            total += part
            if want_grad:
                grad[a:b] = g  # rows a:b of the logits are not read again
        if want_grad:
            ctx.save_for_backward(grad.view(student.shape))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        return _saved_grad(ctx, grad_out), None, None, None, None, None, None, None, None


class _LinearChunkedLoss(torch.autograd.Function):
    """The lean path: like _ChunkedLoss, but the student's logits are made chunk by chunk from its
    final hidden states inside the loss (logits = hidden @ weight.T + bias), and so are a `Head`
    target's. The Liger-Kernel fused-linear idea in plain PyTorch: per chunk, the closed-form
    gradient g = d loss / d logits (rows, V) gives d hidden = g @ weight and d weight += g.T @ hidden
    at once; only (chunk, V) buffers and the (V, H) weight gradient ever exist."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, labels, keep, w_ce, temperature, how, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        want_grad = need_h or need_w or need_b
        chunk = chunk or auto_chunk_rows(weight.shape[0])
        g_h = torch.zeros_like(hidden) if need_h else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk):
            b = a + chunk
            h = hidden[a:b]
            part, g = _chunk_terms(_linear(h, weight, bias), [(_target_chunk(t, a, b), w) for t, w in targets],
                                   None if labels is None else labels[a:b], keep[a:b],
                                   w_ce, temperature, how, want_grad)
            total += part
            if want_grad:
                g = g.to(hidden.dtype)
                if need_h:
                    torch.mm(g, weight.to(hidden.dtype), out=g_h[a:b])
                if need_w:
                    g_w.addmm_(g.t().float(), h.float())
                if need_b:
                    g_b += g.float().sum(0)
            del g
        # Kept on ctx (fresh tensors, not inputs or outputs) rather than saved: backward hands them
        # over and drops its reference, so autograd can take the weight gradient as .grad without a copy.
        ctx.grads = [g_h, None if g_w is None else g_w.to(weight.dtype), None if g_b is None else g_b.to(bias.dtype)]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("stillroom losses support one backward per forward (no retain_graph reuse)")
        g_h, g_w, g_b = ctx.grads
        ctx.grads = None
        scale = lambda g: None if g is None else g.mul_(grad_out)  # noqa: E731
        return scale(g_h), scale(g_w), scale(g_b), None, None, None, None, None, None, None


def linear_mixed_loss(hidden, weight, targets, labels, ce_weight=0.0, temperature=1.0, kind="soft",
                      chunk=None, bias=None, divergence="forward_kl", beta=0.5):
    """`mixed_loss` on the lean path: the student given by its final hidden states (..., H) and its
    output head (weight (V, H), bias (V,)) instead of its logits; targets may be logits, TopK or
    Head (a teacher's hidden states and head). Only positions with a label are computed at all, for
    both models: a prompt token costs no head matmul. Same value and gradients as
    `mixed_loss(hidden @ weight.T + bias, ...)` within fp32 rounding (tests pin it)."""
    how = _how(kind, divergence, beta, targets)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, V = hidden.shape[:-1], weight.shape[0]
    if labels.shape != lead:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)}")
    idx = (labels.reshape(-1) != IGNORE_INDEX).nonzero().view(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)   # (n, H): positions with a label
    y = labels.reshape(-1).index_select(0, idx)
    tt = []
    for t, w in targets:
        if w < 0:
            raise ValueError(f"target weights must be >= 0, got {w}")
        if w == 0:
            continue
        width = t.weight.shape[0] if isinstance(t, Head) else None if isinstance(t, TopK) else t.shape[-1]
        if t.shape[:len(lead)] != lead or (width is not None and width != V):
            raise ValueError(f"a target of shape {tuple(t.shape)} (vocab {width}) does not match the student's "
                             f"positions {tuple(lead)} and vocab {V}; align vocabularies first")
        tt.append(((t.select(idx) if isinstance(t, (TopK, Head)) else _rows(t.detach()).index_select(0, idx)),
                   float(w)))
    keep = torch.ones(idx.shape, dtype=torch.bool, device=hidden.device)
    return _LinearChunkedLoss.apply(h, weight, bias, tuple(tt), y, keep, float(ce_weight), float(temperature),
                                    how, chunk)


def linear_distill_loss(hidden, weight, teacher, labels, alpha=0.5, temperature=1.0, kind="soft",
                        chunk=None, bias=None, divergence="forward_kl", beta=0.5):
    """`distill_loss` on the lean path (see `linear_mixed_loss`); teacher: logits, TopK or Head."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    targets = [(teacher, alpha)] if teacher is not None and alpha > 0 else []
    return linear_mixed_loss(hidden, weight, targets, labels, 1.0 - alpha, temperature, kind, chunk, bias,
                             divergence, beta)


def _check(student_logits, teacher_logits=None, temperature=1.0):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits is None:
        return
    if isinstance(teacher_logits, TopK):
        if teacher_logits.shape != student_logits.shape[:-1]:
            raise ValueError(f"top-k targets for positions {tuple(teacher_logits.shape)} do not match "
                             f"student logits {tuple(student_logits.shape)}")
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; align vocabularies first")


def _mask_or_all(mask, logits):
    if mask is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    return mask.bool()


def _detach(t):
    return t if isinstance(t, TopK) else t.detach()


def forward_kl(student_logits, teacher_logits, mask=None, temperature=1.0, chunk=None):
    """Sum over unmasked positions of T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Hinton et al. 2015. "Forward" = the teacher's distribution is the reference (mode-covering).
    `teacher_logits` may be a TopK (sparse target; see its tail rule).
    """
    _check(student_logits, teacher_logits, temperature)
    keep = _mask_or_all(mask, student_logits)
    return _ChunkedLoss.apply(student_logits, ((_detach(teacher_logits), 1.0),), None, keep,
                              0.0, float(temperature), ("forward_kl", None), chunk, False)


def divergence(name, student_logits, teacher_logits, mask=None, temperature=1.0, beta=0.5, chunk=None):
    """Sum over unmasked positions of T^2 * D(softmax(teacher/T), softmax(student/T)) for any
    divergence in DIVERGENCES (beta: JSD's beta or the skew's a). Chunked like every loss here."""
    _check(student_logits, teacher_logits, temperature)
    how = _how("soft", name, beta, [(teacher_logits, 1.0)])
    keep = _mask_or_all(mask, student_logits)
    return _ChunkedLoss.apply(student_logits, ((_detach(teacher_logits), 1.0),), None, keep,
                              0.0, float(temperature), how, chunk, False)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature=1.0, chunk=None):
    """T^2 KL(student_T || teacher_T), summed: mode-seeking (MiniLLM, Gu et al. 2024)."""
    return divergence("reverse_kl", student_logits, teacher_logits, mask, temperature, chunk=chunk)


def jsd(student_logits, teacher_logits, mask=None, beta=0.5, temperature=1.0, chunk=None):
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), summed, times T^2.

    Convention (TRL's; torchtune and distillm differ): with p the teacher, q the student and
    m = beta p + (1 - beta) q, JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m) for 0 < beta < 1.
    It vanishes at both ends, so the ends are defined by its normalized limits:
    JSD(0) = KL(p || q) (forward, = lim JSD(beta) / beta) and JSD(1) = KL(q || p) (reverse).
    """
    return divergence("jsd", student_logits, teacher_logits, mask, temperature, beta, chunk)


def skew_kl(student_logits, teacher_logits, mask=None, skew=0.1, temperature=1.0, chunk=None):
    """Skew KL of DistiLLM (Ko et al. 2024): KL(p || skew p + (1 - skew) q), summed, times T^2.
    skew 0 = forward KL; skew 1 = 0. Bounded where forward KL is not (q -> 0 under p)."""
    return divergence("skew_kl", student_logits, teacher_logits, mask, temperature, skew, chunk)


def skew_reverse_kl(student_logits, teacher_logits, mask=None, skew=0.1, temperature=1.0, chunk=None):
    """Skew reverse KL of DistiLLM: KL(q || skew q + (1 - skew) p), summed, times T^2. skew 0 = reverse KL."""
    return divergence("skew_rkl", student_logits, teacher_logits, mask, temperature, skew, chunk)


def total_variation(student_logits, teacher_logits, mask=None, temperature=1.0, chunk=None):
    """Total variation 1/2 sum_v |p - q| per position, summed (times T^2, as every KD term here)."""
    return divergence("tv", student_logits, teacher_logits, mask, temperature, chunk=chunk)


def cross_entropy(student_logits, labels, chunk=None):
    """Sum over positions with labels != IGNORE_INDEX of -log softmax(student)[label]."""
    keep = labels != IGNORE_INDEX
    return _ChunkedLoss.apply(student_logits, (), labels, keep, 1.0, 1.0, ("forward_kl", None), chunk, False)


def hard_label_ce(student_logits, teacher_logits, mask=None, chunk=None):
    """Sum over unmasked positions of CE(student, argmax of the teacher's logits).

    The token-level "hard label" variant of knowledge distillation; sequence-level hard labels
    (Kim & Rush 2016) are plain `cross_entropy` on text the teacher generated (`stillroom generate`).
    """
    _check(student_logits, teacher_logits)
    keep = _mask_or_all(mask, student_logits)
    return _ChunkedLoss.apply(student_logits, ((_detach(teacher_logits), 1.0),), None, keep,
                              0.0, 1.0, ("hard", None), chunk, False)


def mixed_loss(student_logits, targets, labels, ce_weight=0.0, temperature=1.0, kind="soft",
               chunk=None, inplace_grad=False, divergence="forward_kl", beta=0.5):
    """sum_j w_j * KD(target_j, student) + ce_weight * CE(labels), summed over valid labels.

    targets: [(logits or TopK, w_j)], all detached (no gradient ever reaches a target).
    kind="soft": KD = T^2 KL(softmax(target/T) || softmax(student/T)); kind="hard": CE against each
    target's argmax token. One chunked pass computes every term; see `distill_loss` for inplace_grad.
    """
    how = _how(kind, divergence, beta, targets)
    for t, w in targets:
        _check(student_logits, t, temperature)
        if w < 0:
            raise ValueError(f"target weights must be >= 0, got {w}")
    keep = labels != IGNORE_INDEX
    tt = tuple((_detach(t), float(w)) for t, w in targets if w > 0)
    return _ChunkedLoss.apply(student_logits, tt, labels, keep, float(ce_weight), float(temperature),
                              how, chunk, bool(inplace_grad))


def distill_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=1.0,
                 kind="soft", chunk=None, inplace_grad=False, divergence="forward_kl", beta=0.5):
    """The seed's hybrid: alpha * KD + (1 - alpha) * CE(true labels), summed over valid labels.

    kind="soft": KD = forward_kl at `temperature`; kind="hard": KD = hard_label_ce.
    The KD term uses the same positions as the labels (labels != IGNORE_INDEX). One chunked pass
    computes both terms.

    inplace_grad=True writes the gradient into `student_logits` during this call (saving one
    full-size buffer): only for a training step that does not read the logits afterwards.
    Autograd's version check refuses it if another op saved the logits for its own backward.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    targets = [(teacher_logits, alpha)] if teacher_logits is not None and alpha > 0 else []
    return mixed_loss(student_logits, targets, labels, 1.0 - alpha, temperature, kind, chunk, inplace_grad,
                      divergence, beta)


def mutual_loss(student_logits, peer_logits, labels, alpha=0.5, temperature=1.0, kind="soft",
                teacher_logits=None, teacher_weight=0.0, chunk=None, inplace_grad=False):
    """Deep Mutual Learning (Zhang et al. 2018) for one peer A, summed over valid labels:

        L_A = alpha * (1 - tw) * mean_B T^2 KL(P_B,T || P_A,T)
            + alpha * tw       * T^2 KL(P_teacher,T || P_A,T)        (hybrid; tw = teacher_weight)
            + (1 - alpha)      * CE(y, P_A)

    peer_logits: the other peers' logits (or TopK); detached here, so a peer's own loss never
    pushes its peers. kind="hard" replaces each KL by CE against that model's argmax tokens.
    With no teacher (tw = 0) this is the paper's loss; the total over peers is sum_A L_A.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= teacher_weight <= 1.0:
        raise ValueError(f"teacher_weight must be in [0, 1], got {teacher_weight}")
    if teacher_weight > 0 and teacher_logits is None:
        raise ValueError("teacher_weight > 0 needs teacher_logits")
    peers = list(peer_logits)
    if not peers and teacher_weight < 1:
        raise ValueError("mutual_loss needs at least one peer (or teacher_weight=1)")
    w_peer = alpha * (1 - teacher_weight) / max(len(peers), 1)
    targets = [(p, w_peer) for p in peers]
    if teacher_weight > 0:
        targets.append((teacher_logits, alpha * teacher_weight))
    return mixed_loss(student_logits, targets, labels, 1.0 - alpha, temperature, kind, chunk, inplace_grad)


def token_stats(student_logits, teacher_logits, labels, chunk=None):
    """No-grad sums over valid labels: student NLL, teacher NLL, KL(teacher || student) at T=1,
    and top-1 agreement count. Used by evaluation; chunked like the losses."""
    s2, t2 = _rows(student_logits), _rows(teacher_logits)
    chunk = chunk or auto_chunk_rows(s2.shape[1])
    y = labels.reshape(-1)
    out = dict(student_nll=0.0, teacher_nll=0.0, kl=0.0, agree=0, tokens=0)
    with torch.no_grad():
        for a in range(0, s2.shape[0], chunk):
            s, t, yy = s2[a:a + chunk].float(), t2[a:a + chunk].float(), y[a:a + chunk]
            valid = yy != IGNORE_INDEX
            if not valid.any():
                continue
            s, t, yy = s[valid], t[valid], yy[valid]
            log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
            out["student_nll"] += -log_q.gather(-1, yy[:, None]).sum().item()
            out["teacher_nll"] += -log_p.gather(-1, yy[:, None]).sum().item()
            out["kl"] += support_kl_rows(log_q, log_p).sum().item()
            out["agree"] += (s.argmax(-1) == t.argmax(-1)).sum().item()
            out["tokens"] += int(valid.sum())
    return out


__all__ = ["IGNORE_INDEX", "DIVERGENCES", "scheduled", "auto_chunk_rows", "TopK", "Head", "divergence", "reverse_kl", "jsd",
           "skew_kl", "skew_reverse_kl", "total_variation", "shift_labels", "topk_targets", "forward_kl", "cross_entropy",
           "hard_label_ce", "mixed_loss", "distill_loss", "mutual_loss", "linear_mixed_loss",
           "linear_distill_loss", "token_stats"]


# ------------------------------------------------------------------------ the general path
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
        chunk = chunk or auto_chunk_rows(s2.shape[1])
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


def general_loss(student_logits, labels, teachers, terms: dict, temperature=1.0, beta=0.5,
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
    for name, w in terms.items():
        if name != "ce" and name not in TEACHER_TERMS:
            raise ValueError(f"unknown loss term {name!r}: use ce, hard or one of {sorted(DIVERGENCES)}")
        if w < 0:
            raise ValueError(f"term weights must be >= 0, got {name}={w}")
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
        lq = log_qT
        if not torch.isfinite(log_p).all():   # outside the teacher's support: renormalize the student
            lq = torch.log_softmax(torch.where(torch.isfinite(log_p), x, float("-inf")) * (1.0 / T), -1)
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


def balance_scale(ema_ce: float | None, ema_kd: float | None, limit: float = 1e4) -> float:
    """The factor on the teacher terms that brings their raw per-token size to the CE term's, so the
    configured weights mean what they say (easydistill#34: a KD term 1000x smaller than CE made
    alpha meaningless). From running means of past steps; 1 before any is known. Clamped."""
    if not ema_ce or not ema_kd or ema_kd <= 0 or ema_ce <= 0:
        return 1.0
    return float(min(max(ema_ce / ema_kd, 1.0 / limit), limit))


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

    return _AutogradChunked.apply(student_rows, fn, chunk or max(1, auto_chunk_rows(max(Vs, Vt)) // 2))
