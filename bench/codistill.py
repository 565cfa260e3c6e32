"""Deep Mutual Learning at CPU scale: two peers co-distilled vs the same two trained independently.

Same init (same seeds), same steps, same batches, same real text; the only difference is the
peer term: `independent` trains each peer with CE alone (loss.alpha=0), `mutual` with
alpha * KL(other || self) + (1 - alpha) * CE (Zhang et al. 2018). Both arms run through
`stillroom.run.codistill` in one process. Printed side by side: held-out perplexity of each peer and
of their ensemble (mean of the two distributions), top-1 agreement between the peers, and each
arm's wall time (ratio only: this machine is noisy).

    .venv/bin/python bench/codistill.py [--steps 300] [--seeds 3] [--knobs burn_in=150,confidence=true]
                                        [--mode weights]

--mode predictions|weights runs the co-distilled arm as Anil et al.'s online distillation: two
processes (launched by Accelerate), one peer each on its own shard of the data, at the same steps,
batch and tokens per peer as the independent arm.

Per seed (3 by default: the peers' init and the data order), each peer co-distilled against the
same peer trained alone on the same loss minus the peer term (here CE alone): the ratios, and in how
many seeds mutual learning won.

Peers are trained from scratch (random init, as in the paper) with the bundled SmolLM2 tokenizer;
the bundled teacher is loaded only as the eval's reference (teacher_weight = 0: it never teaches).
"""
from __future__ import annotations

import sys
import argparse
import json
import logging

import yaml
import tempfile
import time
from pathlib import Path

from stillroom.cli import _quiet_libraries
from stillroom.config import CodistillRunConfig
from stillroom.run.codistill import codistill

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"


def run(arm: str, alpha: float, args, out: Path, seed: int = 0) -> dict:
    cfg = CodistillRunConfig.model_validate({
        "teacher": {"model": "smollm2-135m"},
        "peers": [{"name": "a", "init": "config", "num_layers": 4, "hidden_size": 256, "num_heads": 4},
                  {"name": "b", "init": "config", "num_layers": 2, "hidden_size": 256, "num_heads": 4}],
        "codistill": {"mode": args.mode if arm == "mutual" else "mutual", **(args.knobs if arm == "mutual" else {})},
        "data": {"path": str(args.data), "seq_len": args.seq_len, "eval_fraction": 0.05},
        "loss": {"kind": "soft", "alpha": alpha, "temperature": 1.0},
        "train": {"output_dir": str(out / f"{arm}-{seed}"), "max_steps": args.steps, "batch_size": args.batch_size,
                  "lr": args.lr, "warmup_steps": 20, "log_every": 25, "seed": seed},
        "eval": {"batch_size": 8, "gen_prompts": 1, "gen_tokens": 8},
    })
    t0 = time.perf_counter()
    if arm == "mutual" and args.mode != "mutual":   # one peer per process: launched, as a user would
        result = launched(cfg, out / f"{arm}-{seed}.yaml")
    else:
        result = codistill(cfg, overwrite=True, progress=False)
    result["wall_s"] = time.perf_counter() - t0
    print(f"{arm} seed {seed}: done", flush=True)
    return result


def launched(cfg, path: Path) -> dict:
    """`stillroom codistill` in two processes (codistill.mode predictions or weights: one peer
    each, on its own shard of the data), launched by Accelerate on the CPU (gloo, one thread a
    process) -> the run's metrics.json."""
    import os
    import subprocess

    from stillroom.recipes import to_yaml

    path.write_text(to_yaml(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--dynamo_backend", "no", "-m", "stillroom", "codistill", str(path),
           "--overwrite", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                     CUDA_VISIBLE_DEVICES=""))
    if r.returncode != 0:
        sys.exit(f"the launched run failed:\n{r.stderr[-3000:]}")
    return json.loads((Path(cfg.train.output_dir) / "final" / "metrics.json").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seeds", type=int, default=3, help="seeds (each: both peers' init and the data order)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--mode", default="mutual", choices=["mutual", "predictions", "weights"],
                   help="the co-distilled arm's codistill.mode: mutual in one process (DML), or Anil et al.'s "
                        "online distillation in two processes, one peer each on its own data shard")
    p.add_argument("--knobs", default="", type=lambda x: {k: yaml.safe_load(v) for k, v in
                                                         (kv.split("=", 1) for kv in x.split(",") if kv)},
                   help="codistill settings of the mutual arm, e.g. burn_in=150,confidence=true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _quiet_libraries()
    runs = []   # per seed: {"independent": result, "mutual": result}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            runs.append({"independent": run("independent", 0.0, args, Path(tmp), seed),
                         "mutual": run("mutual", args.alpha, args, Path(tmp), seed)})
    # The fair control of mutual learning without a teacher is the same peer trained alone on the same
    # loss minus the peer term: CE alone (loss.alpha=0), same init, data order and steps.
    rows = [("peer a (4 layers) perplexity", "a after"), ("peer b (2 layers) perplexity", "b after"),
            ("ensemble perplexity", "ensemble after")]
    held = runs[0]["mutual"]["held_out_tokens"]
    print(f"\ndata {args.data.name}; {args.steps} steps x {args.batch_size} x {args.seq_len} tokens; "
          f"alpha {args.alpha}, T 1; held-out {held:,} tokens; peers from scratch, same init per seed, "
          f"{'same batches' if args.mode == 'mutual' else 'the co-distilled peers each on its own shard'}; "
          f"mutual arm: codistill.mode={args.mode}, settings {args.knobs or 'the defaults'}")
    print(f"{'':32}{'seed':>6}{'independent':>14}{'mutual':>14}{'mutual/indep':>14}")
    for label, key in rows:
        for seed, arms in enumerate(runs):
            ind, mut = (arms[k]["eval"][key]["perplexity"] for k in ("independent", "mutual"))
            print(f"{label if seed == 0 else '':32}{seed:>6}{ind:>14.3f}{mut:>14.3f}{mut / ind:>14.3f}")
    for seed, arms in enumerate(runs):
        ind, mut = (arms[k]["peer_agreement"]["after"]["a/b"] for k in ("independent", "mutual"))
        print(f"{'top-1 agreement a/b' if seed == 0 else '':32}{seed:>6}{ind:>14.1%}{mut:>14.1%}{mut / ind:>14.3f}")
    walls = [arms["mutual"]["wall_s"] / arms["independent"]["wall_s"] for arms in runs]
    print(f"{'wall time ratio':32}{'':>6}{'':>14}{'':>14}{sum(walls) / len(walls):>14.3f}")
    wins = {p: sum(arms["mutual"]["eval"][f"{p} after"]["perplexity"] < arms["independent"]["eval"][f"{p} after"]
                   ["perplexity"] for arms in runs) for p in ("a", "b")}
    print(f"mutual beats its fair control (CE alone) in {wins['a']}/{len(runs)} seeds for a, "
          f"{wins['b']}/{len(runs)} for b")
    if args.json:
        args.json.write_text(json.dumps([{k: {kk: v[kk] for kk in ("eval", "peer_agreement", "wall_s")}
                                          for k, v in arms.items()} for arms in runs], indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    # a run with --knobs or another --mode writes its own section: the plain DML one stays
    knobs = any(a == "--knobs" or a.startswith("--knobs=") for a in sys.argv)
    mode = next((m for m in ("predictions", "weights") if m in sys.argv or f"--mode={m}" in sys.argv), None)
    name = "codistill" + (f"-{mode}" if mode else "") + ("-knobs" if knobs else "")
    results.main(main, name, "Co-distillation against the fair control (bench/codistill.py"
                 + (f", mode {mode}" if mode else "") + (", with knobs" if knobs else "") + ")")
