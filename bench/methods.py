"""Every distillation method on real text, one table: same student init, same data, same steps.

    python bench/methods.py [--steps 40] [--batch 4] [--seq 128] [--only NAME ...] [--skip-gemma]

Each row is a full `stillroom distill` run (the library's own loop, config and eval) from the same
6-layer student cut from the bundled SmolLM2-135M-Instruct, on TinyStories (../shared/data), for
--steps optimizer steps of --batch x --seq tokens (on-policy steps train on the student's own
continuations of the same prompts instead). After training, every student is measured the same way
on the same held-out blocks against the SmolLM2 teacher: perplexity, top-1 agreement and
KL(teacher || student) per token. Wall time is the run's training time (eval excluded).

Rows:
  CE only          loss.alpha=0: the data alone (no teacher)
  soft KD          forward KL (Hinton), alpha 0.9
  hard labels      CE against the teacher's argmax tokens, alpha 0.9
  reverse KL       MiniLLM's mode-seeking KL
  JSD(0.5)         GKD's generalized JSD
  on-policy        JSD(0.5) with half the steps on the student's own samples (GKD, lambda 0.5)
  + hidden         soft KD + hidden-state cosine on the mapped layers (DistilBERT's term)
  multi-teacher    an equal mixture of SmolLM2-135M-Instruct and a copy of it fine-tuned on the
                   bench's training text for --domain-steps steps (a "domain expert"), built first
  adaptive         soft KD with T 2 -> 1 (linear), entropy token weights and CE/KD balancing
  cross-tokenizer  Gemma 3 270M (vocab 262k, another tokenizer) teaching the same SmolLM2-tokenizer
                   student with ULD + exact-match (needs `pip install -e '.[gemma]'`)
The machine is noisy: compare within the table, not against absolute seconds.
"""
from __future__ import annotations

import sys
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from stillroom.recipes import load_config
from stillroom.data.store import load_data
from stillroom.eval import evaluate
from stillroom.models import core as models
from stillroom.run.distill import distill

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"

ROWS = {
    "CE only": ["loss.alpha=0.0"],
    "soft KD": [],
    "hard labels": ["loss.kind=hard"],
    "reverse KL": ["loss.divergence=reverse_kl"],
    "JSD(0.5)": ["loss.divergence=jsd", "loss.beta=0.5"],
    "on-policy": ["loss.divergence=jsd", "loss.beta=0.5", "loss.on_policy=0.5", "loss.on_policy_tokens=32"],
    "+ hidden": ["loss.terms={ce: 0.1, forward_kl: 0.9, hidden_cosine: 0.2}"],
    "multi-teacher": ["MIX"],
    "adaptive": ["loss.temperature=2.0", "loss.temperature_end=1.0", "loss.schedule=linear",
                 "loss.token_weight=entropy", "loss.balance=true"],
    "cross-tokenizer": ["teacher.model=gemma3-270m", "student.model=smollm2-135m", "loss.cross_tokenizer=uld"],
}


def base(args, out):
    return [f"data.path={DATA}", "data.eval_fraction=0.1", f"data.seq_len={args.seq}",
            "student.init=from_teacher", "student.num_layers=6", f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch}", "train.lr=5e-4", "train.warmup_steps=4", f"train.log_every={args.steps}",
            "loss.alpha=0.9", f"train.output_dir={out}", "eval.max_batches=1", "eval.gen_prompts=1",
            "eval.gen_tokens=4", "teacher.model=smollm2-135m"]


def domain_teacher(args, work: Path) -> Path:
    """SmolLM2-135M-Instruct fine-tuned briefly on the training text: the second teacher."""
    out = work / "domain"
    cfg = load_config(None, base(args, out) + ["student.init=pretrained", "student.model=smollm2-135m",
                                               "loss.alpha=0.0", f"train.max_steps={args.domain_steps}",
                                               "train.lr=1e-4"])
    distill(cfg, overwrite=True, progress=False)
    return out / "final"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--domain-steps", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=6)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--skip-gemma", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"bench data not found: {DATA} (the bench needs ../shared/data)")
    torch.manual_seed(0)
    teacher = models.load("smollm2-135m")
    cfg0 = load_config(None, base(args, "unused"))
    _, held = load_data(cfg0, teacher.tokenizer)
    held = held[: args.eval_batches * 8]
    pad = teacher.tokenizer.pad_token_id
    rows = [r for r in ROWS if not args.only or r in args.only]
    if args.skip_gemma and "cross-tokenizer" in rows:
        rows.remove("cross-tokenizer")
    results = []
    print(f"TinyStories, {args.steps} steps x {args.batch} x {args.seq} tokens per row; student: 6 of the teacher's "
          f"30 layers; held-out: {len(held)} blocks; reference teacher SmolLM2-135M-Instruct", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in rows:
            extra = ROWS[name]
            if extra == ["MIX"]:
                t0 = time.perf_counter()
                dom = domain_teacher(args, work)
                print(f"  (domain teacher: {args.domain_steps} steps of fine-tuning, {time.perf_counter() - t0:.0f} s)",
                      flush=True)
                extra = [f"teacher.mix=[{{name: domain, model: {dom}, weight: 1.0}}]"]
            out = work / name.replace(" ", "_")
            cfg = load_config(None, base(args, out) + extra)
            t0 = time.perf_counter()
            m = distill(cfg, overwrite=True, progress=False)
            total = time.perf_counter() - t0
            student = models.load(str(out / "final")).model
            cmp = evaluate.score(student, teacher.model, held, pad, 8, None)
            row = {"method": name, "perplexity": cmp["student_perplexity"], "agreement": cmp["agreement"],
                   "kl": cmp["kl_per_token"], "train_s": m["train"].get("elapsed_s"), "run_s": total,
                   "teacher_perplexity": cmp["teacher_perplexity"]}
            results.append(row)
            print(f"  done {name}: ppl {row['perplexity']:.2f}, agreement {row['agreement']:.1%}, "
                  f"KL {row['kl']:.3f}, train {row['train_s']:.0f} s", flush=True)
    print(f"\nteacher perplexity on the same held-out tokens: {results[0]['teacher_perplexity']:.2f}")
    print(f"{'method':<17}{'perplexity':>11}{'agreement':>11}{'KL/token':>10}{'train s':>9}{'vs soft KD':>12}")
    ref = next((r["train_s"] for r in results if r["method"] == "soft KD"), None)
    for r in results:
        rel = f"{r['train_s'] / ref:.2f}x" if ref else "-"
        print(f"{r['method']:<17}{r['perplexity']:>11.2f}{r['agreement']:>11.1%}{r['kl']:>10.3f}"
              f"{r['train_s']:>9.0f}{rel:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    results.main(main, "methods", "Every method on TinyStories (bench/methods.py)")
