"""The laptop hour: cache the bundled teacher once, distill a cut student from the cache, and compare
it with the same student trained with CE alone for the same wall time, the cache's cost included.

    python bench/laptop.py [--minutes 45] [--write]

What it runs is the recipe in docs/getting-started.md, as a user runs it (the `stillroom` commands,
each a fresh process):

1. `stillroom cache`: the teacher's top-64 log-probs over the training text, once (C seconds).
2. `stillroom distill teacher.kind=cache`: a 6-layer student cut from the teacher, trained from the
   cache for (minutes x 60 - C) seconds of training.
3. The control: the same student (same init, data, batch, lr schedule) trained with CE alone
   (`loss.alpha=0`) for minutes x 60 seconds of training: the whole budget, the cache's time included.
4. `stillroom eval` of each student against the live teacher on held-out rows neither trained on:
   perplexity, bits per byte, top-1 agreement, KL, ROUGE-L of greedy answers, size and generation speed.

The trainer stops at a step count, not a clock (its learning-rate schedule is laid out over the steps),
so each arm's step count comes from a timed 12-step run of it: steps = seconds / time per step (the
time of steps 5-12, after the first steps' one-time costs). Both arms' measured training times are
printed beside their budgets; evaluation and process start are outside both budgets.

Data: Alpaca from ../shared/data, its last --held rows held out. Budget: about 2 x --minutes plus ~10 min.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import recorded  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = SHARED / "alpaca_subset" / "alpaca_4500.jsonl"
STILLROOM = [sys.executable, "-m", "stillroom"]


def sh(args: list, log: Path) -> float:
    """Run a stillroom command; its output to `log`; the wall seconds it took. A failure stops the bench."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ stillroom " + " ".join(map(str, args)) + "\n")
        f.flush()
        got = subprocess.run(STILLROOM + [str(a) for a in args], stdout=f, stderr=subprocess.STDOUT)
    if got.returncode:
        raise SystemExit(f"stillroom {args[0]} failed (exit {got.returncode}): see {log}")
    return time.perf_counter() - t0


def step_seconds(run: Path) -> float:
    """Seconds per step over steps 5-12 of a 12-step run logged every step."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    at = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r}
    return (at[12] - at[4]) / 8


def train_seconds(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return max(r["elapsed_s"] for r in rows if "elapsed_s" in r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=45, help="the budget: cache + KD training = CE training")
    ap.add_argument("--layers", type=int, default=6, help="teacher layers the student keeps (of 30)")
    ap.add_argument("--held", type=int, default=300, help="Alpaca rows held out (the last ones)")
    ap.add_argument("--train-rows", type=int, help="train on the first this many rows only (a quick try of the bench)")
    ap.add_argument("--task-rows", type=int, default=32, help="held-out prompts answered for ROUGE-L")
    ap.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--write", action="store_true", help="write the result into docs/results.md")
    args = ap.parse_args()
    if not ALPACA.is_file():
        raise SystemExit(f"bench data not found: {ALPACA} (the bench needs ../shared/data)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp, recorded("laptop", args.write, "The laptop hour"):
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        log = work / "log.txt"
        rows = [x for x in ALPACA.read_text().splitlines() if x.strip()]
        (work / "train.jsonl").write_text("\n".join(rows[:-args.held][:args.train_rows]) + "\n")
        (work / "held.jsonl").write_text("\n".join(rows[-args.held:]) + "\n")
        data = [f"data.path={work / 'train.jsonl'}", f"data.eval_path={work / 'held.jsonl'}",
                "data.pack=true", "data.skip_bad_rows=true", f"student.num_layers={args.layers}", "eval.max_batches=1", "eval.gen_prompts=1",
                "eval.gen_tokens=4"]   # the runs' own evaluation kept short: step 4 measures both students alike
        kd = ["teacher.kind=cache", f"teacher.cache={work / 'cache'}"]
        ce = ["loss.alpha=0"]

        print(f"budget {args.minutes:g} min; data: {len(rows[:-args.held][:args.train_rows])} Alpaca rows to train on, "
              f"{args.held} held out; the student: {args.layers} of the teacher's 30 layers; log: {log}", flush=True)
        cache_s = sh(["cache", *data, f"cache.path={work / 'cache'}", "cache.top_k=64", "--overwrite"], log)
        print(f"1. stillroom cache (top-64, once): {cache_s:.0f} s, the teacher's load included", flush=True)

        per_step = {}
        for name, extra in (("kd", kd), ("ce", ce)):
            run = work / f"time-{name}"
            sh(["distill", *data, *extra, "train.max_steps=12", "train.log_every=1", "train.warmup_steps=2",
                f"train.output_dir={run}", "--overwrite", "--no-progress"], log)
            per_step[name] = step_seconds(run)
        budget = args.minutes * 60
        steps = {"kd": max(1, round((budget - cache_s) / per_step["kd"])), "ce": max(1, round(budget / per_step["ce"]))}
        print(f"   seconds per step: KD from the cache {per_step['kd']:.2f}, CE {per_step['ce']:.2f} "
              f"(ratio {per_step['kd'] / per_step['ce']:.3f}); steps: KD {steps['kd']}, CE {steps['ce']}", flush=True)

        evals = {}
        for i, (name, extra) in enumerate((("kd", kd), ("ce", ce)), 2):
            run = work / name
            wall = sh(["distill", *data, *extra, f"train.max_steps={steps[name]}", "train.log_every=50",
                       f"train.output_dir={run}", "--overwrite", "--no-progress"], log)
            trained = train_seconds(run)
            want = budget - cache_s if name == "kd" else budget
            print(f"{i}. {'KD from the cache' if name == 'kd' else 'CE alone'}: {steps[name]} steps, "
                  f"trained {trained:.0f} s (budget {want:.0f} s), {wall:.0f} s with its own start and evaluations",
                  flush=True)
            out = work / f"eval-{name}.json"
            sh(["eval", "--model", run, "--teacher", "smollm2-135m", "--data", work / "held.jsonl",
                "--task", "rouge", "--task-rows", args.task_rows, "--gen-prompts", 4, "--gen-tokens", 32,
                "--out", out, "--no-progress"], log)
            evals[name] = json.loads(out.read_text())
        report(evals, cache_s, per_step, steps)


def report(evals: dict, cache_s: float, per_step: dict, steps: dict):
    kd_e, ce_e = evals["kd"], evals["ce"]
    print("\nheld-out Alpaca rows, every model scored by `stillroom eval` against the live teacher:")
    keys = [("perplexity", "perplexity", "{:.2f}"), ("bits_per_byte", "bits per byte", "{:.4f}"),
            ("agreement", "top-1 agreement", "{:.1%}"), ("kl_per_token", "KL(teacher||student)/token", "{:.4f}"),
            ("rougeL", "ROUGE-L vs references", "{:.3f}"), ("rougeL_vs_teacher", "ROUGE-L vs the teacher", "{:.3f}"),
            ("params", "parameters", "{:,}"), ("size_mb", "size MB", "{:.1f}"),
            ("gen_tokens_per_s", "generation tokens/s", "{:.1f}")]
    rows = [("", "teacher", "KD from cache", "CE, same time")]
    for key, label, f in keys:
        vals = [flat(ce_e, "teacher").get(key), flat(kd_e, "student").get(key), flat(ce_e, "student").get(key)]
        rows.append((label, *["-" if v is None else f.format(v) for v in vals]))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(f"{r[0]:<{w[0]}}  " + "  ".join(f"{c:>{w[i + 1]}}" for i, c in enumerate(r[1:])))
    t, k, c = flat(ce_e, "teacher"), flat(kd_e, "student"), flat(ce_e, "student")
    print(f"\nKD from the cache / CE, same wall time: perplexity {k['perplexity'] / c['perplexity']:.3f}, "
          f"bits per byte {k['bits_per_byte'] / c['bits_per_byte']:.3f}")
    print(f"the student / the teacher: parameters {k['params'] / t['params']:.3f}, "
          f"generation speed {k['gen_tokens_per_s'] / t['gen_tokens_per_s']:.2f}x, "
          f"bits per byte {k['bits_per_byte'] / t['bits_per_byte']:.2f}x")
    print(f"the cache's one-time cost: {cache_s:.0f} s; {steps['kd']} KD steps vs {steps['ce']} CE steps "
          f"(a step from the cache takes {per_step['kd'] / per_step['ce']:.2f}x a CE step)")


def flat(e: dict, who: str) -> dict:
    """One model's measurements from `stillroom eval --out` JSON: the table's column, plus its task scores."""
    got = dict(e["eval"][who])
    for task in (e.get("tasks") or {}).values():
        got.update(task.get("scores", {}).get(who, {}))
    return got


if __name__ == "__main__":
    main()
