"""The teacher cache, measured in one run: its size, the step it buys, and what it costs in quality.

    .venv/bin/python bench/cache.py [--steps 60] [--examples 300]

Real text: ../shared/data/tinystories, packed into 256-token blocks, tokenized by the bundled
SmolLM2-135M-Instruct teacher (vocab 49,152). Student: 4 layers, hidden 256, random init.

1. Size: bytes per cached position at k = 8, 32, 64 (float16 log-probs, uint16 ids, float32 tail and
   label log-prob), each cache written by `stillroom.teachers.cache.build`, vs the dense fp16 distribution.
2. Step time on one 4 x 256 batch (median of interleaved rounds after a warm-up): the student's plain
   CE step; the KD step reading top-64 targets from the cache (the read is timed); the KD step with
   the live teacher's forward. Target: cached KD step <= 1.15x CE step.
3. Quality: the same student init trained the same steps on the same batches (soft KD at T 1, with
   alpha 0.9 -- the default hybrid with CE on the true tokens -- and alpha 1, KD alone) by
   `stillroom.run.distill.distill` from the top-64 cache and from the live dense teacher; held-out
   perplexity of each. Target: within 2%.
"""
from __future__ import annotations

import sys
import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stillroom.cli import _quiet_libraries
from stillroom.config import StudentConfig
from stillroom.recipes import load_config
from stillroom.data.store import load_data
from stillroom.losses import distill_loss, hybrid, shift_labels
from stillroom.models import core as models
from stillroom.run.distill import distill
from stillroom.teachers.cache import TeacherCache, build, summary

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"


def part_size(cfg_base, teacher, examples, tmp: Path):
    V = models.logits_width(teacher.model)
    rows = []
    for k in (8, 32, 64):
        cfg = cfg_base.model_copy(deep=True)
        cfg.cache.path, cfg.cache.top_k = str(tmp / f"size-k{k}"), k
        build(cfg, examples, teacher.model, teacher.tokenizer, progress=False)
        rows.append((k, summary(cfg.cache.path)["bytes_per_token"]))
    dense = V * 2
    print(f"\n1. cache size ({sum(len(e.input_ids) - 1 for e in examples):,} positions, vocab {V:,})")
    print(f"{'':24}{'bytes/position':>16}{'vs dense fp16':>16}")
    for k, b in rows:
        print(f"{'top-' + str(k):24}{b:>16.0f}{b / dense:>16.4f}")
    print(f"{'dense fp16':24}{dense:>16,}{1:>16.4f}")


def part_step(cfg_base, teacher, examples, tmp: Path, rounds: int):
    cfg = cfg_base.model_copy(deep=True)
    cfg.cache.path, cfg.cache.top_k = str(tmp / "step-k64"), 64
    batch = examples[:4]
    build(cfg, batch, teacher.model, teacher.tokenizer, progress=False)
    cache = TeacherCache(cfg.cache.path)
    ids = torch.tensor([e.input_ids for e in batch])
    labels = shift_labels(ids)
    student = models.student_from_config(teacher.model.config, StudentConfig(init="config", hidden_size=256,
                                                                             num_layers=4, num_heads=4))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    n = int((labels != -100).sum())

    def ce_step():
        student(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def kd_step(targets):
        t = targets()
        s = student(input_ids=ids, use_cache=False).logits
        (distill_loss(s, t, labels, hybrid(1.0), 1.0, inplace_grad=True) / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def live():
        with torch.no_grad():
            return teacher.model(input_ids=ids, use_cache=False).logits

    rows = {"student CE": ce_step,
            "KD from cache (k=64)": lambda: kd_step(lambda: cache.targets(batch, ids.shape[1], "cpu").top),
            "KD, live teacher": lambda: kd_step(live)}
    times = {k: [] for k in rows}
    for r in range(rounds + 1):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n2. step time, batch 4 x {ids.shape[1]} tokens, student {models.num_params(student):,} params, "
          f"median of {rounds} rounds")
    for k, v in med.items():
        print(f"{k:24}{v / med['student CE']:>10.3f} x CE step")
    print(f"cached KD step / CE step = {med['KD from cache (k=64)'] / med['student CE']:.3f}   (target <= 1.15)")


def part_quality(args, tmp: Path):
    cache_dir = tmp / "quality-k64"
    base = [f"data.path={args.data}", "data.seq_len=256", f"data.max_examples={args.examples}",
            "data.eval_fraction=0.1", "student.init=config", "student.hidden_size=256", "student.num_layers=4",
            "student.num_heads=4", "loss.temperature=1.0", f"train.max_steps={args.steps}",
            "train.batch_size=4", "train.lr=2e-3", "train.warmup_steps=5", "eval.gen_prompts=1",
            "eval.gen_tokens=4", f"train.log_every={args.steps}"]
    cfg = load_config(None, base + [f"cache.path={cache_dir}", "cache.top_k=64"])
    teacher = models.load("smollm2-135m")
    train, held = load_data(cfg, teacher.tokenizer)
    t0 = time.perf_counter()
    build(cfg, train + held, teacher.model, teacher.tokenizer, progress=False)
    t_cache = time.perf_counter() - t0
    del teacher
    print(f"\n3. quality: {args.steps} steps x 4 x 256 tokens, soft KD at T 1, same init and batches; "
          f"{len(train)} train / {len(held)} held-out blocks")
    print(f"{'':34}{'held-out ppl':>14}{'wall (rel.)':>14}")
    for alpha in args.alphas:
        results, walls = {}, {}
        for name, extra in (("live dense teacher", []),
                            ("top-64 cache", ["teacher.kind=cache", f"teacher.cache={cache_dir}"])):
            out = tmp / f"{name.replace(' ', '_')}-{alpha}"
            t0 = time.perf_counter()
            results[name] = distill(load_config(None, base + extra + [f"loss.alpha={alpha}",
                                                                      f"train.output_dir={out}"]),
                                    overwrite=True, progress=False)
            walls[name] = time.perf_counter() - t0
        live = results["live dense teacher"]["eval"]["student after"]["perplexity"]
        cached = results["top-64 cache"]["eval"]["student after"]["perplexity"]
        print(f"{f'alpha {alpha}: live dense teacher':34}{live:>14.3f}{1:>14.3f}")
        print(f"{f'alpha {alpha}: top-64 cache':34}{cached:>14.3f}"
              f"{walls['top-64 cache'] / walls['live dense teacher']:>14.3f}")
        print(f"alpha {alpha}: cache / live perplexity = {cached / live:.4f}   (target: within 2%, i.e. <= 1.02)")
        if alpha == args.alphas[0]:
            t_live = walls["live dense teacher"]
    print(f"(building the cache took {t_cache / t_live:.3f} of a live run's wall time; it is paid once for "
          "every later student)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alphas", type=lambda x: [float(a) for a in x.split(",")], default=[0.9, 1.0],
                    help="loss.alpha values for part 3 (0.9: the default hybrid with CE; 1.0: KD alone)")
    ap.add_argument("--parts", default="123", help="which parts to run, e.g. 12")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = models.load("smollm2-135m")
        cfg = load_config(None, [f"data.path={args.data}", "data.seq_len=256", "data.max_examples=16",
                                 "data.eval_fraction=0"])
        examples, _ = load_data(cfg, teacher.tokenizer)
        print(f"data {args.data}")
        if "1" in args.parts:
            part_size(cfg, teacher, examples[:16], tmp)
        if "2" in args.parts:
            part_step(cfg, teacher, examples, tmp, args.rounds)
        del teacher
        if "3" in args.parts:
            part_quality(args, tmp)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    results.main(main, "cache", "Cache bytes and quality (bench/cache.py)")
