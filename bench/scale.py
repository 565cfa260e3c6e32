"""Scale, measured: what loading a teacher costs in host memory (issue 15, lean loading).

    python bench/scale.py [--model smollm2-135m]

Each row loads the model in a fresh process (so one row's peak cannot hide another's), reads every
weight once, and reports the process's peak resident memory (VmHWM) and its peak anonymous memory
during the load (sampled), beside the model's weights in the dtype it was loaded in:

  fp32 load              models.load(..., dtype=float32): what stillroom did for every teacher
  fp32 load, then bf16   the old teacher path: loaded in fp32, cast to bf16 to run
  bf16 load              models.load(..., dtype=bfloat16): the teacher straight in its run dtype
  tokenizer only         models.load_tokenizer: what a tokenizer-only need costs now

VmHWM also counts the weight file's pages read through mmap (page cache, which the kernel reclaims),
so the ratio that matters is the anonymous peak to the weights' bytes. Target (issue 15): bf16 load /
its size <= 1.3.
The remaining items of issue 15's bench (data prep, FSDP2 memory, lean loss at long sequences)
are not measured here yet.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, threading, time, torch
def status(key):
    return [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(key)][0]
peak_anon, done = [status("RssAnon:")], threading.Event()
def sample():   # anonymous memory (what can run a machine out of memory), every 2 ms
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status("RssAnon:"))
        time.sleep(0.002)
from stillroom import models
start_anon = status("RssAnon:")
threading.Thread(target=sample, daemon=True).start()
how, spec = sys.argv[1], sys.argv[2]
m = None
if how == "fp32":
    m = models.load(spec, dtype=torch.float32).model
elif how == "fp32->bf16":
    m = models.load(spec, dtype=torch.float32).model.to(torch.bfloat16)
elif how == "bf16":
    m = models.load(spec, dtype=torch.bfloat16).model
elif how == "tokenizer":
    models.load_tokenizer(spec)
size = 0
if m is not None:   # every weight read once, as a first forward pass would
    for p in m.parameters():
        p.detach().sum()
    size = sum(p.numel() * p.element_size() for p in m.parameters())
done.set()
time.sleep(0.01)
peak_anon[0] = max(peak_anon[0], status("RssAnon:"))
print(json.dumps({"peak": status("VmHWM:"), "anon": peak_anon[0] - start_anon, "weights": size}))
"""


def measure(how: str, spec: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, how, spec], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{how}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(spec: str, title: str):
    rows = {how: measure(how, spec) for how in ("tokenizer", "fp32", "fp32->bf16", "bf16")}
    base, tok_anon = rows["tokenizer"]["peak"], rows["tokenizer"]["anon"]
    mb = 2 ** 20
    print(f"\n{title}")
    print(f"{'load':<14}{'peak RSS MB':>12}{'RSS growth':>12}{'anon peak MB':>14}{'weights MB':>12}"
          f"{'(anon - tokenizer) / weights':>30}")
    for how, r in rows.items():
        ratio = f"{(r['anon'] - tok_anon) / r['weights']:.2f}" if r["weights"] else "-"
        print(f"{how:<14}{r['peak'] / mb:>12.0f}{(r['peak'] - base) / mb:>12.0f}{r['anon'] / mb:>14.0f}"
              f"{r['weights'] / mb:>12.0f}{ratio:>30}")
    old, new = rows["fp32->bf16"]["anon"] - tok_anon, rows["bf16"]["anon"] - tok_anon
    print(f"bf16 load / old fp32-then-cast, anonymous peak for the weights = {new / old:.3f}")
    print(f"bf16 load anonymous peak for the weights / bf16 weights = {new / rows['bf16']['weights']:.3f}"
          "   (target <= 1.3)")


def main():
    import tempfile

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    import transformers
    transformers.utils.logging.disable_progress_bar()
    measure("tokenizer", a.model)   # converts a GGUF teacher once, so no row pays for it
    print("RSS growth: peak RSS (VmHWM) less the tokenizer-only process's; it counts the weight files' pages "
          "read through mmap (page cache, reclaimable). anon peak: the largest anonymous memory growth during "
          "the load, sampled every 2 ms (what can exhaust a machine); the tokenizer-only row's (the tokenizer "
          "is loaded with the model) is taken off before dividing by the weights.")
    table(a.model, f"{a.model}, its folder as stored (the bundled teacher's: fp32 safetensors)")
    from stillroom import models
    with tempfile.TemporaryDirectory() as d:   # most Hugging Face checkpoints are stored in bf16
        m = models.load(a.model, dtype=torch.bfloat16)
        m.model.save_pretrained(d)
        m.tokenizer.save_pretrained(d)
        del m
        table(d, f"{a.model}, saved as bf16 safetensors (as most Hugging Face checkpoints are)")


if __name__ == "__main__":
    main()
