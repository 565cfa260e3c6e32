"""Width pruning: does the activation ranking matter? Same shapes, ranked vs random channels and heads.

    python bench/prune.py [--layers 30] [--heads 6] [--mlp 1152] [--calibration 32] [--eval 24]

From the bundled SmolLM2-135M-Instruct: keep --layers layers (from_teacher's even spread), then in
each layer --heads attention heads and --mlp MLP channels, chosen (a) by stillroom.models.prune's
importance on --calibration TinyStories blocks, (b) at random (seeded), (c) not at all (depth only).
Each model's held-out perplexity and KL to the teacher on --eval other blocks, before any training:
what distillation then has to recover. (Measured: on the intact 30 layers the ranking matters a lot;
after a deep depth cut, e.g. --layers 12, the model is already broken and the width choice is noise.)
"""
from __future__ import annotations

import sys
import argparse
from pathlib import Path

import torch

from stillroom.recipes import load_config
from stillroom.data.examples import collate
from stillroom.data.store import load_data
from stillroom.eval import evaluate
from stillroom.models import core as models
from stillroom.models.prune import importance, prune_width

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--mlp", type=int, default=1152)
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--eval", type=int, default=24)
    args = ap.parse_args()
    teacher = models.load("smollm2-135m")
    cfg = load_config(None, [f"data.path={DATA}", "data.seq_len=256", "data.eval_fraction=0.1"])
    train, held = load_data(cfg, teacher.tokenizer)
    held = held[:args.eval]
    pad = teacher.tokenizer.pad_token_id
    depth, _ = models.student_from_teacher(teacher.model, num_layers=args.layers)
    depth.eval()
    calib = []
    for a in range(0, args.calibration, 8):
        c = collate(train[a:a + 8], pad)
        calib.append({"input_ids": c["input_ids"], "attention_mask": c["attention_mask"]})
    imp = importance(depth, calib)
    g = torch.Generator().manual_seed(0)
    rand = [{"mlp": torch.rand(s["mlp"].shape, generator=g), "heads": torch.rand(s["heads"].shape, generator=g)}
            for s in imp]
    rows = {"depth only" if args.layers < teacher.model.config.num_hidden_layers else "no pruning": depth,
            "width, ranked": prune_width(depth, imp, args.heads, args.mlp)[0].eval(),
            "width, random": prune_width(depth, rand, args.heads, args.mlp)[0].eval()}
    print(f"SmolLM2-135M-Instruct -> {args.layers} layers; width: {args.heads} heads, {args.mlp} MLP channels; "
          f"calibration {args.calibration} blocks, held-out {len(held)} blocks of 256 tokens (TinyStories)")
    print(f"{'model':<24}{'params':>13}{'perplexity':>12}{'KL/token':>10}{'agreement':>11}")
    for name, m in rows.items():
        c = evaluate.score(m, teacher.model, held, pad, 8)
        print(f"{name:<24}{models.num_params(m):>13,}{c['student_perplexity']:>12.1f}{c['kl_per_token']:>10.3f}"
              f"{c['agreement']:>11.1%}")
    print(f"{'teacher':<24}{models.num_params(teacher.model):>13,}{c['teacher_perplexity']:>12.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    results.main(main, "prune", "Width pruning: activations vs random (bench/prune.py)")
