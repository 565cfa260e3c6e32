"""The teacher's forward with sdpa vs eager attention, side by side, at several row lengths: what
teacher.attention=auto rests on (eager on a CPU up to 1024 tokens, the model's own elsewhere).

    python bench/attention.py [--tokens 1024] [--lengths 128,256,512,1024,2048] [--rounds 5]

Teacher: the bundled SmolLM2-135M-Instruct (30 layers, 9 query / 3 key-value heads of 64) in the
dtype stillroom's teacher.dtype=auto picks here, inference mode, its base model (the hidden states
the lean path reads; the head's matmul is the same either way). Each length runs --tokens tokens a
step (batch = tokens / length, at least 1) of real text (../shared/data/tinystories, else the
bundled instructions). Timings: the median of --rounds interleaved rounds after a warm-up, each
implementation timed on its second step in a row. The machine is noisy: compare the ratios.
Fidelity: KL(fp32 sdpa || this) of the full next-token distributions, per token, on the first batch.
"""
from __future__ import annotations

import sys
import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from stillroom.models import core as models
from stillroom.models import running
from stillroom.run.tracking import keep_cpu_memory

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--lengths", default="128,256,512,1024,2048")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    keep_cpu_memory()
    loaded = models.load("smollm2-135m")
    m32 = loaded.model.to(dev).eval()
    dtype = running.teacher_dtype("auto", dev)
    impls = {}
    for name in ("sdpa", "eager"):
        impls[name] = models.cast_parameters(copy.deepcopy(m32), dtype)
        impls[name].set_attn_implementation(name)
    if TINY.is_file():
        text, source = TINY.read_text(), "tinystories"
    else:
        from stillroom.teachers.generate import BUNDLED_PROMPTS
        text, source = BUNDLED_PROMPTS.read_text() * 40, "the bundled instructions (repeated)"
    lengths = [int(x) for x in args.lengths.split(",")]
    need = max(max(args.tokens, n) for n in lengths)
    ids_all = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if len(ids_all) < need:
        ids_all = ids_all.repeat(need // len(ids_all) + 1)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def body(model, ids):
        with torch.inference_mode():
            return running.base_hidden(model, input_ids=ids)

    picks = running.teacher_attention("auto", dev, 256) or "the model's own"
    print(f"device {dev}; teacher smollm2-135m in {str(dtype)[6:]}; {args.tokens} tokens a step from {source}; "
          f"median of {args.rounds} interleaved rounds; teacher.attention=auto picks {picks} at 256 tokens here")
    print(f"\n{'rows x length':<16}{'sdpa s':>9}{'eager s':>9}{'eager/sdpa':>12}{'auto picks':>12}")
    first = None
    for n in lengths:
        b = max(1, args.tokens // n)
        ids = ids_all[: b * n].view(b, n).to(dev)
        first = ids if first is None else first
        times = {k: [] for k in impls}
        for r in range(args.rounds + 1):
            for k, model in impls.items():
                body(model, ids)
                sync()
                t0 = time.perf_counter()
                body(model, ids)
                sync()
                if r:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        pick = running.teacher_attention("auto", dev, n) or "own"
        print(f"{f'{b} x {n}':<16}{med['sdpa']:>9.3f}{med['eager']:>9.3f}{med['eager'] / med['sdpa']:>12.3f}"
              f"{pick:>12}", flush=True)
    with torch.inference_mode():
        ref = torch.log_softmax(m32(input_ids=first, use_cache=False).logits.float(), -1)
        for k, model in impls.items():
            lp = torch.log_softmax(model(input_ids=first, use_cache=False).logits.float(), -1)
            kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
            top1 = float((ref.argmax(-1) == lp.argmax(-1)).float().mean())
            print(f"fidelity {k:<6} KL(fp32 sdpa || {str(dtype)[6:]} {k}) {kl:.5f} nats/token, top-1 agreement "
                  f"{top1:.1%}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    results.main(main, "attention", "The teacher's attention: sdpa vs eager (bench/attention.py)")
