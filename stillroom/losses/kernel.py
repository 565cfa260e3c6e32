"""The fast path: CE, forward KL against dense or top-k targets, hard labels and the other
divergences in one chunked autograd function whose gradient has a closed form (the lean variant
makes the logits from hidden states inside it): `mixed_loss` and `linear_mixed_loss`, which the
front door (`front.distill_loss`) and the single named losses (`named.py`) call."""
from __future__ import annotations

from typing import NamedTuple

import torch

from stillroom.losses.core import (IGNORE_INDEX, Head, TopK, _linear, _masked_kl_rows, _nll_terms, _rowdot, _rows, _saved_grad,
                   _target_chunk, _target_rows, _zero_rows, auto_chunk_rows, on_support)
from stillroom.losses import fused
from stillroom.losses.divergences import _divergence_chunk, _how


def _dense_kl(log_q, t, T, want_grad, masked=None):
    """KL(softmax(t/T) || q) rows, and what the gradient subtracts from q: the target
    probabilities p, or, where the teacher masks tokens (-inf), p + q - q' with q' the student
    renormalized on the teacher's support (`on_support`), so that q - that = q' - p, the gradient of
    the renormalized KL (the one rule every path follows). masked: whether this target may mask
    tokens, decided once per call (`Known`): False skips the masked formula, True computes it and
    the chunk picks it on the device where its rows are not finite (no host sync); None asks the
    device here (a direct call)."""
    log_p = torch.log_softmax(t.float() if T == 1.0 else t.float() * (1.0 / T), dim=-1)
    p = log_p.exp()
    # KL rows = sum_v p (log p - log q); -inf logits give NaN/inf here, caught per chunk below.
    kl = _rowdot(p, log_p.sub_(log_q))
    bad = None
    if masked is None:
        masked = not torch.isfinite(kl).all()
    elif masked:
        bad = ~torch.isfinite(kl).all()   # on the device: the whole chunk takes the masked formula
    if masked:   # log_p was consumed above: recompute it for the masked path
        log_p = torch.log_softmax(t.float() * (1.0 / T), dim=-1)
        lq = on_support(log_q, log_p)
        kl_m = _masked_kl_rows(lq, log_p)
        p_m = (p if bad is None else p.clone()).add_(log_q.exp()).sub_(lq.exp()) if want_grad else p
        kl, p = (kl_m, p_m) if bad is None else (torch.where(bad, kl_m, kl), torch.where(bad, p_m, p))
    return kl, (p if want_grad else None)


class Known(NamedTuple):
    """What each chunk would otherwise ask the device (a host sync each, on a GPU), decided once
    per call: same_rows, the KD rows are the labelled rows (CE's gradient folds into the KD one);
    drop, some rows do not count (their gradient rows are zeroed); masks, per target, whether it
    may hold -inf logits (a teacher that masks tokens). A `Head` target's logits are made from a
    linear head, finite: it masks nothing. ce_drop: some rows have no label (CE's rows zeroed).
    drop and ce_drop are None where the host asks per chunk (ASK_PER_CHUNK)."""
    same_rows: bool
    drop: bool | None
    masks: tuple
    ce_drop: bool | None


# Devices the host reads without waiting for queued work: there asking per chunk which rows are
# dropped costs nothing and is cheaper than what replaces it on an accelerator (a masked fill of
# every chunk's gradient when any row of the call is dropped: two full passes per chunk on the eager
# path; measured in docs/results.md, "Issue 28's reshape"), so drop and ce_drop are None there
# (asked per chunk). The other decisions are taken once per call everywhere.
ASK_PER_CHUNK = frozenset({"cpu"})


def _known(targets, y, keep) -> Known:
    valid = None if y is None else y != IGNORE_INDEX
    same = valid is not None and torch.equal(keep, valid)
    masks = tuple(torch.is_tensor(t) and not _finite(t) for t, _ in targets)
    if keep.device.type in ASK_PER_CHUNK:
        return Known(same, None, masks, None)
    drop = not bool(keep.all())
    return Known(same, drop, masks, drop if same else valid is not None and not bool(valid.all()))


def _finite(t) -> bool:
    """Is every value of t finite? One reduction (min and max: a NaN or an infinity shows in one of
    them), where isfinite(t).all() would make full-size temporaries of the teacher's logits."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


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


def _chunk_terms(s, targets, y, keep, w_ce, temperature, how, want_grad, fused_dtype=None, eager_rows=None,
                 remake=None, known: Known | None = None):
    """Loss sum and d loss / d s for one chunk of rows, with as few full passes as we can.

    fused_dtype: try the compiled kernel (`fused.py`) first, its gradient in that dtype; a chunk
    it does not take runs eager, at most eager_rows rows at a time (see `_rows_for`). remake: s is
    a fresh chunk of logits this function may spend, and remake() makes it again: the compiled
    kernel then writes the gradient over s (one (rows, V) buffer fewer), and a chunk it gives
    back after it ran is made again for the eager kernel.

    s: (n, V) student logits; targets: [(dense (n, V) logits or TopK rows, weight)];
    y: (n,) labels or None; keep: (n,) bool rows that count for the KD terms (CE rows are
    y != IGNORE_INDEX). Gradients in closed form: d/ds [T^2 KL(p || softmax(s/T))] = T (q - p)
    with q = softmax(s/T), so for a weighted sum of targets it is T (sum_j w_j q - sum_j w_j p_j);
    d/ds CE(y) = softmax(s) - onehot(y). Returns (loss, grad (n, V) fp32 or None).
    known: the call's `Known` (the kernels pass it: no host sync inside their chunk loop); None
    asks the device per chunk.
    """
    if fused_dtype is not None:
        into = remake is not None and s.dtype == fused_dtype and s.is_contiguous()
        done = (fused.chunk_terms(s, targets, y, keep, w_ce, temperature, how, fused_dtype, into, known)
                if want_grad else None)
        if done is fused.REDO:
            s = remake()
        elif done is not None:
            return done
        if eager_rows and s.shape[0] > eager_rows:   # a compiled-size chunk the kernel did not take
            return _eager_split(s, targets, y, keep, w_ce, temperature, how, want_grad, fused_dtype, eager_rows,
                                known)
    s = s.float()
    loss = s.new_zeros(())
    masks = known.masks if known is not None else (None,) * len(targets)
    masks = [m for (t, w), m in zip(targets, masks) if w]
    targets = [(t, w) for t, w in targets if w]
    use_ce = bool(w_ce) and y is not None
    name, param = how
    hard = name == "hard"
    if targets and name not in ("hard", "forward_kl"):   # another divergence: autograd per chunk
        return _divergence_chunk(s, targets, y, keep, w_ce, temperature, name, param, want_grad, masks)
    soft = bool(targets) and not hard
    T = temperature if soft else 1.0
    log_q = torch.log_softmax(s if T == 1.0 else s * (1.0 / T), dim=-1)   # log softmax(s / T)
    log_q1 = log_q if T == 1.0 else None                                    # log softmax(s)
    grad = None
    valid = None if y is None else y != IGNORE_INDEX
    # At T = 1 the CE gradient, softmax(s) - onehot(y), shares q with the KD gradient: fold it in
    # (one exp pass fewer) when both count the same rows, as in training (keep == labelled rows).
    fuse_ce = (soft and use_ce and want_grad and T == 1.0
               and (known.same_rows if known is not None else torch.equal(keep, valid))
               and not (len(targets) == 1 and isinstance(targets[0][0], TopK)))

    if soft:
        single = len(targets) == 1
        q = log_q.exp() if want_grad or any(isinstance(t, TopK) for t, _ in targets) else None
        acc, w_sum = None, 0.0  # acc = sum_j w_j p_j (just p_1 for a single target)
        for (t, w), m in zip(targets, masks):
            sparse = isinstance(t, TopK)
            kl, p = _sparse_kl(log_q, q, t) if sparse else _dense_kl(log_q, t, T, want_grad, m)
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
            grad = _zero_rows(grad, keep, None if known is None else known.drop)
        del acc, q
    else:
        # Hard labels: CE against each target's argmax token at each position.
        # log_q is still needed by the CE term when both run at T = 1: not consumed here.
        for t, w in targets:
            top = t.argmax() if isinstance(t, TopK) else t.argmax(dim=-1, keepdim=True)
            part, g = _nll_terms(log_q, top, keep, w, want_grad, consume=False,
                                 drop=None if known is None else known.drop)
            loss = loss + part
            if want_grad:
                grad = g if grad is None else grad.add_(g)

    if use_ce:
        y_safe = torch.where(valid, y, 0).unsqueeze(-1)
        if log_q1 is None:
            log_q1 = torch.log_softmax(s, dim=-1)
        part, g = _nll_terms(log_q1, y_safe, valid, w_ce, want_grad and not fuse_ce, consume=True,
                             drop=None if known is None else known.ce_drop)
        loss = loss + part
        if g is not None:
            grad = g if grad is None else grad.add_(g)
    if want_grad and grad is None:
        grad = torch.zeros_like(s)
    return loss, grad


def _eager_split(s, targets, y, keep, w_ce, temperature, how, want_grad, dtype, rows, known=None):
    """_chunk_terms in the eager kernel, `rows` rows at a time, for a chunk sized for the compiled
    one: the eager kernel's fp32 passes stay at their own size; the gradient is gathered in `dtype`."""
    loss = s.new_zeros((), dtype=torch.float32)
    grad = torch.empty(s.shape, dtype=dtype, device=s.device) if want_grad else None
    for a in range(0, s.shape[0], rows):
        b = a + rows
        part, g = _chunk_terms(s[a:b], [(_target_chunk(t, a, b), w) for t, w in targets],
                               None if y is None else y[a:b], keep[a:b], w_ce, temperature, how, want_grad,
                               known=known)
        loss += part
        if want_grad:
            grad[a:b] = g
    return loss, grad


def _rows_for(chunk, vocab, compiled, dtype, device=None):
    """(rows per chunk, most rows per eager chunk). A chunk the caller gives is kept. The automatic
    one (`auto_chunk_rows`) is four times as many rows where the compiled kernel runs on 2-byte
    logits (bf16/fp16, mixed precision): per row it holds the logits (the gradient written over
    them on the lean path) and a teacher's, in that dtype, where the eager kernel holds several
    fp32 rows, so four times the rows still take less memory than the eager chunk (0.80x on the
    lean path at 49k: `bench/peers.py --memory-only`), and the head's matmuls run faster on thick
    chunks (the weight gradient's products most of all): a KD step in 0.95-0.99x the time of
    twice the rows, live and from a cache, in A/B runs on an AVX512-BF16 CPU. In fp32 the compiled
    kernel keeps the eager size (twice the rows measured no faster). A chunk the compiled kernel
    gives way on runs eager at the automatic size."""
    if chunk:
        return chunk, chunk
    base = auto_chunk_rows(vocab, device)
    return (4 * base, base) if compiled and dtype.itemsize == 2 else (base, base)


class _ChunkedLoss(torch.autograd.Function):
    """sum_j w_j KD(student, target_j) + w_ce * CE(student, labels), summed, chunked over rows.

    The forward computes each chunk's loss and gradient together (one pass over the logits) and
    writes the gradient into one buffer in the logits' dtype -- or, with `inplace`, into the
    student logits themselves, which are dead after the loss in a training step (as Liger-Kernel
    does); the backward only scales it. Only the student receives a gradient: the targets are
    passed inside a tuple, so autograd does not even see them (detached by construction).
    """

    @staticmethod
    def forward(ctx, student, targets, labels, keep, w_ce, temperature, how, chunk, inplace, compiled=False):
        want_grad = ctx.needs_input_grad[0]
        s2 = _rows(student)
        chunk, eager_rows = _rows_for(chunk, s2.shape[1], compiled, student.dtype, student.device)
        t2 = [(_target_rows(t), w) for t, w in targets]
        y = labels.reshape(-1) if labels is not None else None
        k = keep.reshape(-1)
        known = _known(t2, y, k)   # the call's few host reads, before the chunk loop
        grad = None
        if want_grad:
            grad = s2 if inplace else torch.empty(s2.shape, dtype=student.dtype, device=student.device)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a in range(0, s2.shape[0], chunk):
            b = a + chunk
            part, g = _chunk_terms(s2[a:b], [(_target_chunk(t, a, b), w) for t, w in t2],
                                   None if y is None else y[a:b], k[a:b],
                                   w_ce, temperature, how, want_grad, student.dtype if compiled else None,
                                   eager_rows, known=known)
            total += part
            if want_grad:
                grad[a:b] = g  # rows a:b of the logits are not read again
        if want_grad:
            ctx.save_for_backward(grad.view(student.shape))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        return _saved_grad(ctx, grad_out), None, None, None, None, None, None, None, None, None


FLUSH = 8   # low-precision head: chunks whose weight-gradient products are summed before the fp32 sum


class _LinearChunkedLoss(torch.autograd.Function):
    """The lean path: like _ChunkedLoss, but the student's logits are made chunk by chunk from its
    final hidden states inside the loss (logits = hidden @ weight.T + bias), and so are a `Head`
    target's. The Liger-Kernel fused-linear idea in plain PyTorch: per chunk, the closed-form
    gradient g = d loss / d logits (rows, V) gives d hidden = g @ weight and d weight += g.T @ hidden
    at once; only (chunk, V) buffers and the (V, H) weight gradient ever exist.

    `dtype`: the dtype of the head's three matmuls (None: the hidden states'), as autocast would
    run the model's own head: bf16 under bf16 mixed precision. The softmax passes and the loss
    stay fp32 whatever it is; the weight gradient is summed in fp32 (in `dtype` within groups of
    FLUSH chunks: about FLUSH roundings where autocast's one product has one)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, labels, keep, w_ce, temperature, how, chunk, dtype,
                compiled=False):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        want_grad = need_h or need_w or need_b
        dtype = dtype or hidden.dtype
        chunk, eager_rows = _rows_for(chunk, weight.shape[0], compiled, dtype, hidden.device)
        hc, wc = hidden.to(dtype), weight.to(dtype)          # no copy when they already are
        bc = None if bias is None else bias.to(dtype)
        g_h = torch.empty_like(hidden) if need_h else None    # every row is written by its chunk
        g_w = None   # the fp32 weight gradient: the first product (or group) starts it, no zero-filled sum
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_w16, pending = None, 0
        known = _known(targets, labels, keep)   # the call's few host reads, before the chunk loop
        for a in range(0, hidden.shape[0], chunk):
            b = a + chunk
            h = hc[a:b]
            part, g = _chunk_terms(_linear(h, wc, bc), [(_target_chunk(t, a, b), w) for t, w in targets],
                                   None if labels is None else labels[a:b], keep[a:b],
                                   w_ce, temperature, how, want_grad, dtype if compiled else None, eager_rows,
                                   remake=lambda: _linear(h, wc, bc), known=known)
            total += part
            if want_grad:
                g = g.to(dtype)
                if need_h and g_h.dtype == dtype:
                    torch.mm(g, wc, out=g_h[a:b])
                elif need_h:
                    g_h[a:b] = torch.mm(g, wc)
                if need_w and dtype == torch.float32:
                    g_w = torch.mm(g.t(), h) if g_w is None else g_w.addmm_(g.t(), h)
                elif need_w:
                    # In low precision a product into the fp32 sum per chunk costs a full (V, H)
                    # conversion each time: the products are summed in `dtype` over FLUSH chunks
                    # (fused, as autocast's one product is formed), then added to the fp32 sum.
                    g_w16 = torch.mm(g.t(), h) if g_w16 is None else g_w16.addmm_(g.t(), h)
                    pending += 1
                    if pending == FLUSH or b >= hidden.shape[0]:   # a full group, or the last chunk
                        g_w = g_w16.float() if g_w is None else g_w.add_(g_w16)
                        g_w16, pending = None, 0
                if need_b:
                    g_b += g.float().sum(0)
            del g
        if need_w and g_w is None:   # no rows with a label
            g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
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
        return scale(g_h), scale(g_w), scale(g_b), None, None, None, None, None, None, None, None, None


def linear_mixed_loss(hidden, weight, targets, labels, ce_weight=0.0, temperature=1.0, kind="soft",
                      chunk=None, bias=None, divergence="forward_kl", beta=0.5, dtype=None, compiled=False):
    """`mixed_loss` on the lean path: the student given by its final hidden states (..., H) and its
    output head (weight (V, H), bias (V,)) instead of its logits; targets may be logits, TopK or
    Head (a teacher's hidden states and head). Only positions with a label are computed at all, for
    both models: a prompt token costs no head matmul. Same value and gradients as
    `mixed_loss(hidden @ weight.T + bias, ...)` within fp32 rounding (tests pin it). `dtype`: run
    the student's head matmuls in it (bf16 under bf16 mixed precision, as autocast runs the
    model's own head on the plain path); None = the hidden states' dtype. compiled: run the chunks
    the compiled kernel covers through it (`losses/fused.py`; the same values within rounding)."""
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
                                    how, chunk, dtype, bool(compiled))


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


def mixed_loss(student_logits, targets, labels, ce_weight=0.0, temperature=1.0, kind="soft",
               chunk=None, inplace_grad=False, divergence="forward_kl", beta=0.5, compiled=False):
    """sum_j w_j * KD(target_j, student) + ce_weight * CE(labels), summed over valid labels.

    targets: [(logits or TopK, w_j)], all detached (no gradient ever reaches a target).
    kind="soft": KD = T^2 KL(softmax(target/T) || softmax(student/T)); kind="hard": CE against each
    target's argmax token. One chunked pass computes every term. inplace_grad=True writes the
    gradient into `student_logits` during this call (saving one full-size buffer): only for a
    training step that does not read the logits afterwards (autograd's version check refuses it if
    another op saved them). compiled: see `linear_mixed_loss`. Reached through `front.distill_loss`.
    """
    how = _how(kind, divergence, beta, targets)
    for t, w in targets:
        _check(student_logits, t, temperature)
        if w < 0:
            raise ValueError(f"target weights must be >= 0, got {w}")
    keep = labels != IGNORE_INDEX
    tt = tuple((_detach(t), float(w)) for t, w in targets if w > 0)
    return _ChunkedLoss.apply(student_logits, tt, labels, keep, float(ce_weight), float(temperature),
                              how, chunk, bool(inplace_grad), bool(compiled))
