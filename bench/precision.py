"""What bf16 mixed precision costs in quality: the same run in fp32 and under bf16 autocast, side by side.

    python bench/precision.py [--steps 80] [--batch 4] [--seq 128] [--eval-batches 6]

Two full `stillroom distill` runs that differ only in train.mixed_precision (no, then bf16): the same
6-layer student cut from the bundled SmolLM2-135M-Instruct, the same seed, data (TinyStories,
../shared/data), teacher (teacher.dtype=auto for both), optimizer and steps. bf16 means autocast
for the student's forward and backward with fp32 master weights, optimizer state and loss (what
Accelerate's mixed_precision=bf16 does). After training both students are measured the same way on
the same held-out blocks against the teacher: perplexity, top-1 agreement, KL(teacher || student).

The verdict line is the rule of issue 16: bf16 may be the default (train.mixed_precision=auto on a
device that runs bf16 natively) only if its held-out perplexity is within 1% of fp32's. Time per
step is printed too, but it says something only on a device with native bf16 (a GPU, a CPU with
AVX512-BF16 or AMX): elsewhere bf16 is emulated and slower. Quality does not depend on that.
"""
from __future__ import annotations

import sys
import argparse
import tempfile
import time
from pathlib import Path

import torch

from stillroom.recipes import load_config
from stillroom.data.store import load_data
from stillroom.eval import evaluate
from stillroom.models import core as models
from stillroom.models import running
from stillroom.run.distill import distill

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"


def base(args, out):
    return [f"data.path={DATA}", "data.eval_fraction=0.1", f"data.seq_len={args.seq}",
            "student.init=from_teacher", "student.num_layers=6", f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch}", "train.lr=5e-4", "train.warmup_steps=4",
            f"train.log_every={args.steps}", "train.seed=0", f"train.output_dir={out}", "eval.max_batches=1",
            "eval.gen_prompts=1", "eval.gen_tokens=4", "teacher.model=smollm2-135m"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=6)
    args = ap.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"bench data not found: {DATA} (the bench needs ../shared/data)")
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported() or running.cpu_has_native_bf16()
    teacher = models.load("smollm2-135m")
    _, held = load_data(load_config(None, base(args, "unused")), teacher.tokenizer)
    held = held[: args.eval_batches * 8]
    print(f"TinyStories, {args.steps} steps x {args.batch} x {args.seq} tokens; student: 6 of the teacher's 30 "
          f"layers; held-out: {len(held)} blocks; this device runs bf16 {'natively' if native else 'EMULATED (slow)'}",
          flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mp in (("fp32", "no"), ("bf16 autocast", "bf16")):
            out = Path(tmp) / mp
            cfg = load_config(None, base(args, out) + [f"train.mixed_precision={mp}"])
            t0 = time.perf_counter()
            m = distill(cfg, overwrite=True, progress=False)
            run_s = time.perf_counter() - t0
            student = models.load(str(out / "final")).model
            cmp = evaluate.score(student, teacher.model, held, teacher.tokenizer.pad_token_id, 8, None)
            rows[name] = {"perplexity": cmp["student_perplexity"], "agreement": cmp["agreement"],
                          "kl": cmp["kl_per_token"], "step_s": (m["train"].get("elapsed_s") or run_s) / args.steps}
            print(f"  done {name}: ppl {rows[name]['perplexity']:.3f}, KL {rows[name]['kl']:.4f}", flush=True)
    print(f"\nteacher perplexity on the same held-out tokens: {cmp['teacher_perplexity']:.3f}")
    print(f"{'student precision':<18}{'perplexity':>11}{'agreement':>11}{'KL/token':>10}{'s/step':>9}")
    for name, r in rows.items():
        print(f"{name:<18}{r['perplexity']:>11.3f}{r['agreement']:>11.2%}{r['kl']:>10.4f}{r['step_s']:>9.2f}")
    a, b = rows["fp32"], rows["bf16 autocast"]
    loss = b["perplexity"] / a["perplexity"] - 1
    print(f"\nbf16 / fp32: perplexity {b['perplexity'] / a['perplexity']:.4f} ({loss:+.2%}), KL {b['kl'] / a['kl']:.4f}, "
          f"time per step {b['step_s'] / a['step_s']:.2f}{'' if native else ' (emulated bf16: not a speed figure)'}")
    print(f"verdict: bf16 {'may' if loss <= 0.01 else 'may NOT'} be the default where the device runs it natively "
          f"(perplexity cost {loss:+.2%}, limit +1%)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    results.main(main, "precision", "fp32 vs bf16 autocast (bench/precision.py)")
