"""The single losses by name, each a pure function summed over unmasked positions: forward KL
(Hinton et al.), the other divergences of DIVERGENCES, CE and token-level hard labels. Each is one
term of the kernel (`kernel.py`); a weighted sum of them is `front.distill_loss`."""
from __future__ import annotations

from stillroom.losses.core import IGNORE_INDEX
from stillroom.losses.divergences import _how
from stillroom.losses.kernel import _ChunkedLoss, _check, _detach, _mask_or_all


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


def jsd(student_logits, teacher_logits, mask=None, temperature=1.0, beta=0.5, chunk=None):
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), summed, times T^2.

    Convention (TRL's; torchtune and distillm differ): with p the teacher, q the student and
    m = beta p + (1 - beta) q, JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m) for 0 < beta < 1.
    It vanishes at both ends, so the ends are defined by its normalized limits:
    JSD(0) = KL(p || q) (forward, = lim JSD(beta) / beta) and JSD(1) = KL(q || p) (reverse).
    """
    return divergence("jsd", student_logits, teacher_logits, mask, temperature, beta, chunk)


def skew_kl(student_logits, teacher_logits, mask=None, temperature=1.0, skew=0.1, chunk=None):
    """Skew KL of DistiLLM (Ko et al. 2024): KL(p || skew p + (1 - skew) q), summed, times T^2.
    skew 0 = forward KL; skew 1 = 0. Bounded where forward KL is not (q -> 0 under p)."""
    return divergence("skew_kl", student_logits, teacher_logits, mask, temperature, skew, chunk)


def skew_reverse_kl(student_logits, teacher_logits, mask=None, temperature=1.0, skew=0.1, chunk=None):
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
