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
gradient magnitude independent of T. -inf logits (masked vocabulary entries) contribute nothing:
terms where the teacher has zero probability are 0, and terms where the student gives -inf to a
token the teacher likes are dropped rather than made infinite (as torchtune and TRL do).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_ROWS = 64


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


def _chunk_terms(s, t, y, keep, w_kd, w_ce, temperature, hard, want_grad):
    """Loss sum and d loss / d s for one chunk of rows, with as few full passes as we can.

    s: (n, V) student logits; t: (n, V) teacher logits or None; y: (n,) labels or None;
    keep: (n,) bool rows that count for the KD term (CE rows are y != IGNORE_INDEX).
    Gradients in closed form: d/ds [T^2 KL(p || softmax(s/T))] = T (q - p) with q = softmax(s/T);
    d/ds CE(y) = softmax(s) - onehot(y). Returns (loss, grad (n, V) fp32 or None).
    """
    s = s.float()
    loss = s.new_zeros(())
    use_kd = bool(w_kd) and t is not None
    use_ce = bool(w_ce) and y is not None
    soft = use_kd and not hard
    T = temperature if soft else 1.0
    log_q = torch.log_softmax(s if T == 1.0 else s * (1.0 / T), dim=-1)   # log softmax(s / T)
    log_q1 = log_q if T == 1.0 else None                                    # log softmax(s)
    grad = None

    if soft:
        log_p = torch.log_softmax(t.float() * (1.0 / T), dim=-1)
        p = log_p.exp()
        # KL rows = sum_v p (log p - log q); -inf logits give NaN/inf here, caught per row below.
        kl = _rowdot(p, log_p.sub_(log_q))
        if not torch.isfinite(kl).all():  # log_p was consumed above: recompute it for the masked path
            kl = _masked_kl_rows(log_q, torch.log_softmax(t.float() * (1.0 / T), dim=-1))
        loss = loss + w_kd * T * T * torch.where(keep, kl, 0.0).sum()
        if want_grad:
            grad = _zero_rows(log_q.exp().sub_(p).mul_(w_kd * T), keep)     # T (q - p), weighted
        del p, log_p
    elif use_kd:
        # Hard labels: CE against the teacher's argmax token at each position.
        # log_q is still needed by the CE term when both run at T = 1: not consumed here.
        loss, grad = _nll_terms(log_q, t.argmax(dim=-1, keepdim=True), keep, w_kd, want_grad, consume=False)

    if use_ce:
        valid = y != IGNORE_INDEX
        y_safe = torch.where(valid, y, 0).unsqueeze(-1)
        if log_q1 is None:
            log_q1 = torch.log_softmax(s, dim=-1)
        part, g = _nll_terms(log_q1, y_safe, valid, w_ce, want_grad, consume=True)
        loss = loss + part
        if want_grad:
            grad = g if grad is None else grad.add_(g)
    if want_grad and grad is None:
        grad = torch.zeros_like(s)
    return loss, grad


class _ChunkedLoss(torch.autograd.Function):
    """w_kd * KD(student, teacher) + w_ce * CE(student, labels), summed, chunked over rows.

    The forward computes each chunk's loss and gradient together (one pass over the logits) and
    writes the gradient into one buffer in the logits' dtype -- or, with `inplace`, into the
    student logits themselves, which are dead after the loss in a training step (as Liger-Kernel
    does); the backward only scales it. Only the student receives a gradient: teacher targets are
    constants (detached by design).
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, keep, w_kd, w_ce, temperature, hard, chunk, inplace):
        want_grad = ctx.needs_input_grad[0]
        s2 = _rows(student)
        t2 = _rows(teacher) if teacher is not None else None
        y = labels.reshape(-1) if labels is not None else None
        k = keep.reshape(-1)
        grad = None
        if want_grad:
            grad = s2 if inplace else torch.empty(s2.shape, dtype=student.dtype, device=student.device)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a in range(0, s2.shape[0], chunk):
            b = a + chunk
            part, g = _chunk_terms(s2[a:b], None if t2 is None else t2[a:b],
                                   None if y is None else y[a:b], k[a:b],
                                   w_kd, w_ce, temperature, hard, want_grad)
            total += part
            if want_grad:
                grad[a:b] = g  # rows a:b of the logits are not read again
        if want_grad:
            ctx.save_for_backward(grad.view(student.shape))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # Scaled in place: the buffer is ours alone, and this saves a full-size copy.
        if getattr(ctx, "used", False):
            raise RuntimeError("stillroom losses support one backward per forward (no retain_graph reuse)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out), None, None, None, None, None, None, None, None, None


def _check(student_logits, teacher_logits=None, temperature=1.0):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; align vocabularies first")


def _mask_or_all(mask, logits):
    if mask is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    return mask.bool()


def forward_kl(student_logits, teacher_logits, mask=None, temperature=1.0, chunk=DEFAULT_CHUNK_ROWS):
    """Sum over unmasked positions of T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Hinton et al. 2015. "Forward" = the teacher's distribution is the reference (mode-covering).
    """
    _check(student_logits, teacher_logits, temperature)
    keep = _mask_or_all(mask, student_logits)
    return _ChunkedLoss.apply(student_logits, teacher_logits.detach(), None, keep,
                              1.0, 0.0, float(temperature), False, chunk, False)


def cross_entropy(student_logits, labels, chunk=DEFAULT_CHUNK_ROWS):
    """Sum over positions with labels != IGNORE_INDEX of -log softmax(student)[label]."""
    keep = labels != IGNORE_INDEX
    return _ChunkedLoss.apply(student_logits, None, labels, keep, 0.0, 1.0, 1.0, False, chunk, False)


def hard_label_ce(student_logits, teacher_logits, mask=None, chunk=DEFAULT_CHUNK_ROWS):
    """Sum over unmasked positions of CE(student, argmax of the teacher's logits).

    The token-level "hard label" variant of knowledge distillation; sequence-level hard labels
    (Kim & Rush 2016) are plain `cross_entropy` on text the teacher generated (`stillroom generate`).
    """
    _check(student_logits, teacher_logits)
    keep = _mask_or_all(mask, student_logits)
    return _ChunkedLoss.apply(student_logits, teacher_logits.detach(), None, keep,
                              1.0, 0.0, 1.0, True, chunk, False)


def distill_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=1.0,
                 kind="soft", chunk=DEFAULT_CHUNK_ROWS, inplace_grad=False):
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
    if kind not in ("soft", "hard"):
        raise ValueError(f"kind must be 'soft' or 'hard', got {kind!r}")
    _check(student_logits, teacher_logits, temperature)
    keep = labels != IGNORE_INDEX
    teacher = teacher_logits.detach() if teacher_logits is not None and alpha > 0 else None
    return _ChunkedLoss.apply(student_logits, teacher, labels, keep, float(alpha), 1.0 - alpha,
                              float(temperature), kind == "hard", chunk, bool(inplace_grad))


def token_stats(student_logits, teacher_logits, labels, chunk=DEFAULT_CHUNK_ROWS):
    """No-grad sums over valid labels: student NLL, teacher NLL, KL(teacher || student) at T=1,
    and top-1 agreement count. Used by evaluation; chunked like the losses."""
    s2, t2 = _rows(student_logits), _rows(teacher_logits)
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
            out["kl"] += _masked_kl_rows(log_q, log_p).sum().item()
            out["agree"] += (s.argmax(-1) == t.argmax(-1)).sum().item()
            out["tokens"] += int(valid.sum())
    return out


__all__ = ["IGNORE_INDEX", "shift_labels", "forward_kl", "cross_entropy", "hard_label_ce",
           "distill_loss", "token_stats"]
