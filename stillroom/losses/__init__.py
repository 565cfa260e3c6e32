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

The front door is `distill_loss(student, targets, labels, terms, temperature)` (front.py): one
loss spec, a dict of term weights (`hybrid(alpha)` writes the seed's), and the engine picked inside
(the closed-form kernel, lean or plain, or the general chunked engine). The single losses by name
(`forward_kl`, `jsd`, ...) are in named.py.

One argument order for every public function: the student's side first (logits, or hidden states
and head), then the targets (teacher logits, TopK, Head, or a weighted list of them), then labels
or mask, then the weights (alpha, ce_weight), then temperature, then the divergence's own parameter
(beta, skew), then chunk; `divergence(name, ...)` takes the divergence's name first.
"""
from __future__ import annotations

from stillroom.losses.core import (CHUNK_ELEMENTS, IGNORE_INDEX, Head, TopK, auto_chunk_rows, on_support, shift_labels,
                                   support_kl_rows, topk_targets)
from stillroom.losses.divergences import DIVERGENCES
from stillroom.losses.front import Mixture, distill_loss, hybrid, kernel_fits, mutual_loss
from stillroom.losses.general import (TEACHER_TERMS, TOKEN_WEIGHTS, attention_loss, hidden_loss, mixture_logp,
                                      token_weights, uld_loss)
from stillroom.losses.named import (cross_entropy, divergence, forward_kl, hard_label_ce, jsd, reverse_kl, skew_kl,
                                    skew_reverse_kl, total_variation)

__all__ = ["IGNORE_INDEX", "CHUNK_ELEMENTS", "DIVERGENCES", "TEACHER_TERMS", "TOKEN_WEIGHTS", "TopK", "Head",
           "Mixture", "auto_chunk_rows", "shift_labels", "topk_targets", "on_support", "support_kl_rows",
           "distill_loss", "hybrid", "kernel_fits", "mutual_loss",
           "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "total_variation", "divergence",
           "cross_entropy", "hard_label_ce", "token_weights", "mixture_logp", "hidden_loss", "attention_loss",
           "uld_loss"]
