"""Deep Mutual Learning at CPU scale: two peers co-distilled vs the same two trained independently.

Same init (same seeds), same steps, same batches, same real text; the only difference is the
peer term: `independent` trains each peer with CE alone (loss.alpha=0), `mutual` with
alpha * KL(other || self) + (1 - alpha) * CE (Zhang et al. 2018). Both arms run through
`stillroom.run.codistill` in one process. Printed side by side: held-out perplexity of each peer and
of their ensemble (mean of the two distributions), top-1 agreement between the peers, and each
arm's wall time (ratio only: this machine is noisy).

    .venv/bin/python bench/codistill.py [--steps 300] [--data ../shared/data/tinystories/...]

Peers are trained from scratch (random init, as in the paper) with the bundled SmolLM2 tokenizer;
the bundled teacher is loaded only as the eval's reference (teacher_weight = 0: it never teaches).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from stillroom.cli import _quiet_libraries
from stillroom.config import CodistillRunConfig
from stillroom.run.codistill import codistill

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"


def run(arm: str, alpha: float, args, out: Path) -> dict:
    cfg = CodistillRunConfig.model_validate({
        "teacher": {"model": "smollm2-135m"},
        "peers": [{"name": "a", "init": "config", "num_layers": 4, "hidden_size": 256, "num_heads": 4},
                  {"name": "b", "init": "config", "num_layers": 2, "hidden_size": 256, "num_heads": 4}],
        "codistill": {"mode": "mutual"},
        "data": {"path": str(args.data), "seq_len": args.seq_len, "eval_fraction": 0.05},
        "loss": {"kind": "soft", "alpha": alpha, "temperature": 1.0},
        "train": {"output_dir": str(out / arm), "max_steps": args.steps, "batch_size": args.batch_size,
                  "lr": args.lr, "warmup_steps": 20, "log_every": 25, "seed": 0},
        "eval": {"batch_size": 8, "gen_prompts": 1, "gen_tokens": 8},
    })
    t0 = time.perf_counter()
    result = codistill(cfg, overwrite=True, progress=False)
    result["wall_s"] = time.perf_counter() - t0
    print(f"{arm}: done", flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        arms = {"independent": run("independent", 0.0, args, Path(tmp)),
                "mutual": run("mutual", args.alpha, args, Path(tmp))}
    rows = []
    for key, label in (("a after", "peer a (4 layers) perplexity"), ("b after", "peer b (2 layers) perplexity"),
                       ("ensemble after", "ensemble perplexity")):
        rows.append((label, [arms[k]["eval"][key]["perplexity"] for k in arms]))
    rows.append(("top-1 agreement a/b", [arms[k]["peer_agreement"]["after"]["a/b"] for k in arms]))
    rows.append(("KL(teacher||ensemble)/token", [arms[k]["eval"]["ensemble after"]["kl_per_token"] for k in arms]))
    held = arms["mutual"]["held_out_tokens"]
    print(f"\ndata {args.data.name}; {args.steps} steps x {args.batch_size} x {args.seq_len} tokens; "
          f"alpha {args.alpha}, T 1; held-out {held:,} tokens; peers from scratch, same init and batches")
    print(f"{'':32}{'independent':>14}{'mutual':>14}{'mutual/indep':>14}")
    for label, (ind, mut) in rows:
        fmt = "{:.1%}" if "agreement" in label else "{:.3f}"
        print(f"{label:32}{fmt.format(ind):>14}{fmt.format(mut):>14}{mut / ind:>14.3f}")
    print(f"{'wall time ratio':32}{'':>14}{'':>14}{arms['mutual']['wall_s'] / arms['independent']['wall_s']:>14.3f}")
    if args.json:
        args.json.write_text(json.dumps({k: {kk: v[kk] for kk in ("eval", "peer_agreement", "wall_s")}
                                         for k, v in arms.items()}, indent=2))


if __name__ == "__main__":
    main()
