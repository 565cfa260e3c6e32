"""Offline teacher targets, byte for byte: stillroom's cache against DistillKit's compressed layouts
and top-k renormalized without a tail (issue 31 item 4, first part: bytes and reconstruction).

    .venv/bin/python bench/captures.py [--examples 24] [--write]

The bundled teacher (SmolLM2-135M-Instruct, fp32, vocab 49,152) over held-out Alpaca rows from
../shared/data (the last --examples rows, chat-rendered, 256 tokens at most), every position with a
loss. For each layout, per position:

  bytes       what one position costs on disk: stillroom's cache k x (2-byte id + the log-prob dtype)
              + 8 (the tail's log-mass and the true token's log-prob, float32); DistillKit's
              compressed_logprobs row (teachers/distillkit.py's encoder, from the format's spec) +
              its ids bit-packed in ceil(log2 49152) = 16 bits;
  KL          KL(teacher || reconstruction), nats, over the whole vocabulary: the reconstruction is
              the stored top-k probabilities and the rest of the mass spread evenly over the other
              tokens (stillroom stores that mass; DistillKit's import takes 1 - sum(top-k), as
              stillroom's importer does); top-k renormalized puts nothing outside the top-k, so its
              KL is infinite: the mass it drops is printed instead;
  top-1       the reconstruction's most likely token is the teacher's;
  |dlogp|     mean absolute error of the stored top-k log-probs against the teacher's.

DistillKit's layouts are its README's: "default" (k 128, 16 exact bf16, a fit of t^0..t^4 and
sqrt t in fp32) and "budget" (k 50, 1 exact bf16, a fit of 1, t, sqrt t). Not measured here yet: a
student trained from each at equal steps, and a compressed stillroom cache.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_subset" / "alpaca_4500.jsonl"
V = 49152
DISTILLKIT = {
    "default": {"d": V, "k": 128, "exact_k": 16, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
                "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "normalize_t": False},
    "budget": {"d": V, "k": 50, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
               "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "normalize_t": False},
}


def teacher_rows(examples, model, kmax: int):
    """-> (top-kmax log-probs (N, kmax) float64, their ids, sum p log p over the vocabulary (N,))
    at every position with a loss, fp32 teacher."""
    from stillroom.teachers.cache import positions

    lps, ids, plogp = [], [], []
    for e in examples:
        pos = positions(e)
        if not pos:
            continue
        with torch.no_grad():
            lp = model(input_ids=torch.tensor([e.input_ids])).logits[0, pos].float().log_softmax(-1)
        top = lp.topk(kmax)
        lps.append(top.values.double())
        ids.append(top.indices)
        plogp.append((lp.exp() * lp).double().sum(-1))
    return torch.cat(lps).numpy(), torch.cat(ids).numpy(), torch.cat(plogp).numpy()


def measure(true_lp, got_lp, plogp, with_tail: bool = True, stored_tail: bool = False) -> dict:
    """KL(teacher || the reconstruction) over the vocabulary, top-1 agreement, mean |d log p| (the
    first k columns of true_lp are the stored ones, in order). stored_tail: the tail mass is the
    teacher's, stored in float32 (stillroom's cache); else 1 - the stored top-k's mass."""
    k = got_lp.shape[1]
    p = np.exp(true_lp[:, :k])
    rest = np.clip(1 - p.sum(-1), 0, None)                      # the teacher's mass outside the top-k
    top_kl = (p * (true_lp[:, :k] - got_lp)).sum(-1)
    out = {"top1": float(np.mean(got_lp.argmax(-1) == 0)), "dlogp": float(np.abs(got_lp - true_lp[:, :k]).mean())}
    if not with_tail:
        out.update(kl=math.inf, dropped=float(rest.mean()))
        return out
    q_rest = (rest.astype(np.float32).astype(np.float64) if stored_tail
              else np.clip(1 - np.exp(got_lp).sum(-1), 1e-12, None))   # stored, or derived
    rest_plogp = plogp - (p * true_lp[:, :k]).sum(-1)           # sum over the rest of p log p
    kl = top_kl + rest_plogp - rest * np.log(q_rest / (V - k))
    out.update(kl=float(kl.mean()), dropped=0.0)
    return out


def main():
    from stillroom.cli import _quiet_libraries
    from stillroom.config import DataConfig
    from stillroom.data.examples import build_examples
    from stillroom.models import core as models
    from stillroom.teachers import distillkit

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--examples", type=int, default=24)
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"this bench reads {args.data}, which is not here")
    _quiet_libraries()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = models.load("smollm2-135m", dtype=torch.float32)
    examples, _ = build_examples(str(args.data), teacher.tokenizer, DataConfig(path=str(args.data), seq_len=256,
                                                                                     skip_bad_rows=True))
    examples = examples[-args.examples:]
    true_lp, _, plogp = teacher_rows(examples, teacher.model, 128)
    n = len(true_lp)
    rows = []
    for k in (16, 32, 64, 128):
        for dtype, width in (("float16", 2), ("float32", 4)):
            got = torch.tensor(true_lp[:, :k]).to(getattr(torch, dtype)).double().numpy()
            rows.append((f"stillroom cache, top-{k} {dtype}", k * (2 + width) + 8,
                         measure(true_lp, got, plogp, stored_tail=True)))
    for name, cfg in DISTILLKIT.items():
        k = cfg["k"]
        data = distillkit.encode_logprobs(true_lp[:, :k], cfg)
        got = distillkit.decode_logprobs(data, cfg)
        rows.append((f"DistillKit {name} (k {k})", data.shape[1] + -(-k * distillkit.index_bits(V) // 8),
                     measure(true_lp, got, plogp)))
    for k in (50, 64):
        got = torch.tensor(true_lp[:, :k]).half().double().numpy()
        renorm = got - np.log(np.exp(got).sum(-1, keepdims=True))
        rows.append((f"top-{k} fp16 renormalized, no tail", k * 4, measure(true_lp, renorm, plogp, with_tail=False)))
    print(f"\n{n:,} positions with a loss, {len(examples)} held-out Alpaca rows (the last of {args.data.name}), "
          f"bundled teacher in fp32, vocab {V:,}")
    print(f"{'':40}{'bytes':>7}{'KL(teacher||rec.)':>19}{'top-1':>8}{'|dlogp|':>10}{'mass dropped':>14}")
    for name, b, m in rows:
        kl = "inf" if math.isinf(m["kl"]) else f"{m['kl']:.5f}"
        print(f"{name:<40}{b:>7}{kl:>19}{m['top1']:>8.1%}{m['dlogp']:>10.5f}{m['dropped']:>14.4f}")
    print(f"(dense fp16: {V * 2:,} bytes a position)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import results
    results.main(main, "captures", "Offline targets against DistillKit's layouts (bench/captures.py)")
