"""The one front door of the losses: `distill_loss(student, targets, labels, terms, temperature)`.

One loss spec: `terms`, a dict of weights {"ce": w, "<divergence>" or "hard": w}. The caller says
what to minimize; this module picks the engine that computes it:

- the closed-form chunked kernel (`kernel.py`) when the step has at most one teacher term, plain
  targets (logits, TopK or Head, each with a float weight), no per-token weights, no balancing scale
  and no raw parts asked for: lean when the student comes as a `Head` (its final hidden states and
  output head), plain on its logits; compiled where the caller asks (`fused.wanted`);
- the general chunked engine (`general.py`) otherwise: a `Mixture` of teachers, several teacher
  terms, per-token weights, `kd_scale`, the raw sum of each term (`parts`).

Both give the same values and gradients where both apply (tests/losses/test_front.py pins it), so the
choice is about speed and memory only. Objectives never name an engine.

Each target j with weight w_j adds sum_term terms[term] * w_j * term(target_j); CE is counted once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stillroom.losses.core import Head, _linear
from stillroom.losses.general import check_terms, general_loss
from stillroom.losses.kernel import linear_mixed_loss, mixed_loss


@dataclass
class Mixture:
    """Several teachers as one target: p = sum_k w_k p_k at the loss's temperature, w_k a float or
    a per-position tensor (routing: one-hot per example); at each position the weights sum to 1.
    `parts`: [(logits or TopK, w_k)]."""
    parts: list

    @property
    def shape(self):
        return self.parts[0][0].shape


def hybrid(alpha: float = 0.5, kind: str = "soft", divergence: str = "forward_kl") -> dict:
    """The seed's loss as terms: alpha * KD + (1 - alpha) * CE, KD a divergence at the temperature
    (kind soft; forward KL = Hinton et al.'s T^2 KL) or CE against the teacher's argmax (kind hard)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if kind not in ("soft", "hard"):
        raise ValueError(f"kind must be 'soft' or 'hard', got {kind!r}")
    return {("hard" if kind == "hard" else divergence): alpha, "ce": 1.0 - alpha}


def kernel_fits(terms: dict, mixture: bool = False, token_weight: str = "none", balanced: bool = False) -> bool:
    """Does the closed-form kernel compute this loss (at most one teacher term, plain targets, no
    per-token weights, no balancing scale)? The rule `distill_loss` picks its engine by; an
    objective asks it to know whether the student may come as a Head (the lean path)."""
    named = [n for n in terms if n != "ce"]   # a term named with weight 0 still counts: the spec asked for it
    return len(named) <= 1 and not mixture and token_weight == "none" and not balanced


def _as_targets(targets) -> list:
    if targets is None:
        return []
    if not isinstance(targets, (list, tuple)):
        return [(targets, 1.0)]
    for t, w in targets:
        if torch.is_tensor(w) and not isinstance(t, Mixture):
            raise ValueError("a per-position target weight (routing) belongs inside a Mixture")
    return list(targets)


def distill_loss(student, targets, labels, terms: dict, temperature=1.0, *, beta=0.5, token_weight="none",
                 kd_scale=1.0, parts: dict | None = None, chunk=None, dtype=None, inplace_grad=False,
                 compiled=False):
    """sum_term terms[term] * (sum_j w_j * term(target_j)), summed over positions with a label (CE once).

    student: its logits (..., V), or a `Head` (final hidden states (..., H), head weight (V, H),
    bias): the lean path, where only labelled rows are ever turned into logits. targets: one target
    or [(target, w_j)], a target being logits, `TopK`, `Head` or `Mixture`. terms: see `hybrid`.
    token_weight (TOKEN_WEIGHTS), kd_scale (on the teacher terms) and parts (the raw sums of the
    terms, added to the dict) are the general engine's. chunk: rows per chunk (None: sized to the
    vocabulary). dtype: the student head's matmul dtype on the lean path. inplace_grad: write the
    gradient into the student's logits (a training step that does not read them again). compiled:
    run the kernel's chunks through torch.compile where it covers them.
    """
    check_terms(terms)
    targets = _as_targets(targets)
    mixture = any(isinstance(t, Mixture) for t, _ in targets)
    if kd_scale == 1.0 and parts is None and kernel_fits(terms, mixture, token_weight):
        return _kernel(student, targets, labels, terms, temperature, beta, chunk, dtype, inplace_grad, compiled)
    logits = _linear(student.hidden, student.weight, student.bias) if isinstance(student, Head) else student
    if not targets:
        return general_loss(logits, [], labels, terms, temperature, beta, token_weight, kd_scale, parts, chunk)
    total = None
    for j, (t, w) in enumerate(targets):   # CE with the first target only; a Mixture is one target
        scaled = {n: (v if n == "ce" else v * w) for n, v in terms.items() if n != "ce" or j == 0}
        mix = t.parts if isinstance(t, Mixture) else [(t, 1.0)]
        one = general_loss(logits, mix, labels, scaled, temperature, beta, token_weight, kd_scale, parts, chunk)
        total = one if total is None else total + one
    return total


def _kernel(student, targets, labels, terms, temperature, beta, chunk, dtype, inplace_grad, compiled):
    name = next((n for n in terms if n != "ce"), "forward_kl")
    w = terms.get(name, 0.0)
    kind = "hard" if name == "hard" else "soft"
    tt = [(t, wt * w) for t, wt in targets] if w else []
    how = dict(ce_weight=terms.get("ce", 0.0), temperature=temperature, kind=kind, chunk=chunk,
               divergence=name if kind == "soft" else "forward_kl", beta=beta)
    if isinstance(student, Head):
        return linear_mixed_loss(student.hidden, student.weight, tt, labels, bias=student.bias, dtype=dtype,
                                 compiled=compiled, **how)
    return mixed_loss(student, tt, labels, inplace_grad=inplace_grad, compiled=compiled, **how)


def mutual_loss(student_logits, peer_logits, labels, alpha=0.5, temperature=1.0, kind="soft",
                teacher_logits=None, teacher_weight=0.0, chunk=None, inplace_grad=False):
    """Deep Mutual Learning (Zhang et al. 2018) for one peer A, summed over valid labels:

        L_A = alpha * (1 - tw) * mean_B T^2 KL(P_B,T || P_A,T)
            + alpha * tw       * T^2 KL(P_teacher,T || P_A,T)        (hybrid; tw = teacher_weight)
            + (1 - alpha)      * CE(y, P_A)

    peer_logits: the other peers' logits (or TopK), never pushed by A's loss. kind="hard" replaces
    each KL by CE against that model's argmax tokens. With no teacher (tw = 0) this is the paper's
    loss; the total over peers is sum_A L_A."""
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
    targets = [(p, w_peer) for p in peers if w_peer > 0]
    if teacher_weight > 0:
        targets.append((teacher_logits, alpha * teacher_weight))
    return distill_loss(student_logits, targets, labels, {("hard" if kind == "hard" else "forward_kl"): 1.0,
                                                          "ce": 1.0 - alpha},
                        temperature, chunk=chunk, inplace_grad=inplace_grad)
