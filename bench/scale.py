"""Scale, measured: what loading a teacher costs in host memory (issue 15, lean loading).

    python bench/scale.py [--model smollm2-135m]

Each row loads the model in a fresh process (so one row's peak cannot hide another's) and reads
the process's peak resident memory (VmHWM) after the load, beside the model's weights in the dtype
it was loaded in:

  fp32 load              models.load(..., dtype=float32): what stillroom did for every teacher
  fp32 load, then bf16   the old teacher path: loaded in fp32, cast to bf16 to run
  bf16 load              models.load(..., dtype=bfloat16): the teacher straight in its run dtype
  tokenizer only         models.load_tokenizer: what a tokenizer-only need costs now

The interpreter, torch and transformers take memory of their own before any weight is read: the
tokenizer-only process (the same imports, no weights) is the baseline, and the ratios are of the
growth over it (peak - baseline) to the weights' bytes. Target (issue 15): bf16 load / its size <= 1.3.
The remaining items of issue 15's bench (data prep, FSDP2 memory, lean loss at long sequences)
are not measured here yet.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from stillroom import models
how, spec = sys.argv[1], sys.argv[2]
size = 0
if how == "fp32":
    m = models.load(spec, dtype=torch.float32).model
elif how == "fp32->bf16":
    m = models.load(spec, dtype=torch.float32).model.to(torch.bfloat16)
elif how == "bf16":
    m = models.load(spec, dtype=torch.bfloat16).model
elif how == "tokenizer":
    models.load_tokenizer(spec)
    m = None
if m is not None:
    size = sum(p.numel() * p.element_size() for p in m.parameters())
peak = [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
print(json.dumps({"peak": peak, "weights": size}))
"""


def measure(how: str, spec: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, how, spec], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{how}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    measure("tokenizer", a.model)   # converts a GGUF teacher once, so no row pays for it
    rows = {how: measure(how, a.model) for how in ("tokenizer", "fp32", "fp32->bf16", "bf16")}
    base = rows["tokenizer"]["peak"]
    mb = 2 ** 20
    print(f"model {a.model}")
    print(f"{'load':<22}{'peak RSS MB':>12}{'growth MB':>11}{'weights MB':>12}{'growth / weights':>18}")
    for how, r in rows.items():
        grow = r["peak"] - base
        ratio = f"{grow / r['weights']:.2f}" if r["weights"] else "-"
        print(f"{how:<22}{r['peak'] / mb:>12.0f}{grow / mb:>11.0f}{r['weights'] / mb:>12.0f}{ratio:>18}")
    print("(growth: peak RSS less the tokenizer-only process's, which has the same imports and no weights)")
    old, new = rows["fp32->bf16"]["peak"] - base, rows["bf16"]["peak"] - base
    print(f"bf16 load peak growth / old fp32-then-cast peak growth = {new / old:.3f}")
    print(f"bf16 load peak growth / bf16 weights = {new / rows['bf16']['weights']:.3f}   (target <= 1.3)")


if __name__ == "__main__":
    main()
