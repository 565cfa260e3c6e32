"""Scale, measured: what loading a teacher costs in host memory, and what the data store costs to
build and to start from (issue 15).

    python bench/scale.py [--model smollm2-135m] [--only loading|data] [--rows 1000000]

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

Data (`--only data`; issue 15, the data store), on rows synthesized from ../shared/data:

  prep throughput   building a store (all cores, data.workers = cores) from Alpaca rows, in tokens
                    per second, / the tokenizer's own batched encode (its Rust threads, all cores)
                    of the same rows rendered with the chat template (rendering not timed): the
                    store does that encode plus the rendering, the label spans and the writing.
                    Target >= 0.7.
  startup           a second run's start, config read to the first batch ready (a fresh process:
                    config, tokenizer, the store opened, the epoch's order, one micro-batch
                    collated), for 1M rows / for 10k rows of short prompt/response rows (lines of
                    tinyshakespeare, wikitext2, tinystories; one example each). Target <= 1.5.
  RSS growth        that process's peak RSS with 1M rows less with 10k rows. Target <= 100 MB.

FSDP2 (`--only fsdp`): real distill runs on the bundled teacher (bf16 where the CPU runs it
natively) and a 6-layer student cut from it, stopped after 6 steps of the same global batch:

  memory   per process, the bytes of the student's parameters + gradients + optimizer state it
           holds (its shards under FSDP2), after a step; and the same plus the teacher's
           parameters. FSDP2 over 2 processes / one process: target <= 0.6 for both.
  time     the median step (steps 3-6) with FSDP2 over 2 processes, with DDP over 2 processes, and
           in one process: printed, not a target (2 CPU cores here).

The lean loss at long sequences (`--only lean`): `linear_mixed_loss` (soft KD + CE, the default
chunking) forward + backward from random final hidden states (H 576, the bundled teacher's) and
output heads, every position labelled, at seq_len 256, 1024, 4096 and vocabularies of 49,152
(SmolLM2) and 262,144 (Gemma 3): time per token and the peak of the memory the loss adds beyond
its inputs and the gradients it must return (sampled op by op, as bench/kd_step.py does): both
should stay flat as the sequence grows (a chunk's worth, not a (seq, vocab) tensor).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, threading, time, torch
def status(key):
    return [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(key)][0]
peak_anon, done = [status("RssAnon:")], threading.Event()
def sample():   # anonymous memory (what can run a machine out of memory), every 2 ms
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status("RssAnon:"))
        time.sleep(0.002)
from stillroom.models import core as models
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


SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

STARTUP = r"""
import json, os, sys, time
t0 = time.perf_counter()
from stillroom.config import Config
from stillroom.recipes import load_config
from stillroom.data import store
from stillroom.data import examples as data
from stillroom.models import core as models
cfg = load_config(None, [f"data.path={sys.argv[1]}", "data.seq_len=256", "train.batch_size=8"], Config)
tok = models.load_tokenizer(sys.argv[2])
train, held = store.load_data(cfg, tok)
batch = data.collate(data.micro_batch(train, 0, cfg.train.batch_size, cfg.train.seed), tok.pad_token_id)
seconds = time.perf_counter() - t0
peak = [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]
print(json.dumps({"s": seconds, "peak": peak, "train": len(train)}))
"""


def _run(code: str, *args, env=None) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       timeout=7200, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


BUILD = r"""
import json, os, sys, time
from stillroom.config import Config
from stillroom.recipes import load_config
from stillroom.data import store
from stillroom.models import core as models
cfg = load_config(None, [f"data.path={sys.argv[1]}", "data.seq_len=2048", f"data.workers={sys.argv[3]}",
                         "data.skip_bad_rows=true"] + ([f"data.store={os.environ['STORE_ROOT']}"]
                                                       if os.environ.get("STORE_ROOT") else []), Config)
tok = models.load_tokenizer(sys.argv[2])
t0 = time.perf_counter()
train, held = store.load_data(cfg, tok)
print(json.dumps({"s": time.perf_counter() - t0, "tokens": train.store.index["tokens"]}))
"""

ENCODE = r"""
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "true"
from stillroom.data.rows import read_row
from stillroom.models import core as models
tok = models.load_tokenizer(sys.argv[2])
texts = []
for line in open(sys.argv[1]):
    row = read_row(json.loads(line))
    if isinstance(row, str) or not row.messages[-1]["content"].strip():   # rows the store skips
        continue
    texts.append(tok.apply_chat_template(row.messages, tokenize=False))
best = None
for _ in range(2):
    t0 = time.perf_counter()
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    s = time.perf_counter() - t0
    best = s if best is None else min(best, s)
print(json.dumps({"s": best, "tokens": sum(len(x) for x in ids)}))
"""


def data_bench(model: str, rows: int):
    import os
    import tempfile

    if not SHARED.is_dir():
        raise SystemExit(f"the data bench synthesizes its rows from {SHARED}, which is not here")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        env = dict(os.environ, STILLROOM_CACHE=str(d / "cache"))
        alpaca = [json.loads(x) for x in open(SHARED / "alpaca_subset" / "alpaca_4500.jsonl")]
        rows_file = d / "alpaca.jsonl"
        with open(rows_file, "w") as f:   # ~20k rows (~8 MB): each row once per copy, told apart by a number
            for k in range(5):
                for i, r in enumerate(alpaca):
                    f.write(json.dumps({**r, "instruction": f"{r['instruction']} ({k * len(alpaca) + i})"}) + "\n")
        _run(BUILD, SHARED / "gsm8k" / "train.jsonl", model, 1, env=env)   # tokenizer conversion, imports: warm
        builds, encodes = [], []
        for rep in range(3):   # interleaved, each build into a fresh store; the best of each (a noisy machine)
            builds.append(_run(BUILD, rows_file, model, cores, env={**env, "STORE_ROOT": str(d / f"store{rep}")}))
            encodes.append(_run(ENCODE, rows_file, model, env=env))
        built, enc = min(builds, key=lambda r: r["s"]), min(encodes, key=lambda r: r["s"])
        a, b = built["tokens"] / built["s"], enc["tokens"] / enc["s"]
        print(f"\ndata prep, {rows_file.stat().st_size / 2**20:.1f} MB of Alpaca rows, {cores} cores, best of 3 interleaved")
        print(f"  store build ({cores} processes): {built['tokens']:,} tokens in {built['s']:.1f} s = {a:,.0f} tokens/s "
              f"(all: {', '.join('%.1f' % r['s'] for r in builds)} s)")
        print(f"  the tokenizer's batched encode of the rendered rows: {enc['tokens']:,} tokens in {enc['s']:.1f} s "
              f"= {b:,.0f} tokens/s (all: {', '.join('%.1f' % r['s'] for r in encodes)} s)")
        print(f"  store build / batched encode = {a / b:.2f}   (target >= 0.7)")

        lines = [x.strip() for name in ("tinyshakespeare/train.txt", "wikitext2/valid.txt",
                                        "tinystories/tinystories_valid_head.txt")
                 for x in open(SHARED / name, encoding="utf-8") if len(x.strip()) > 20]
        found = {}
        for n in (10_000, rows):
            path = d / f"text-{n}.jsonl"
            with open(path, "w") as f:
                for i in range(n):   # one example per row (prompt/response rows are never packed)
                    f.write(json.dumps({"prompt": f"{lines[i % len(lines)]} {i}",
                                        "response": lines[(i + 1) % len(lines)]}) + "\n")
            t = _run(BUILD, path, model, cores, env=env)
            found[n] = {"build": t, "start": min((_run(STARTUP, path, model, env=env) for _ in range(3)),
                                                 key=lambda x: x["s"])}
        small, big = found[10_000]["start"], found[rows]["start"]
        mb = 2 ** 20
        print("\nsecond-run startup (config read to first batch ready; best of 3 fresh processes), short "
              "prompt/response rows (one example each)")
        for n, f_ in found.items():
            print(f"  {n:>9,} rows: store built once in {f_['build']['s']:.1f} s ({f_['build']['tokens']:,} tokens); "
                  f"startup {f_['start']['s']:.2f} s, peak RSS {f_['start']['peak'] / mb:.0f} MB, "
                  f"{f_['start']['train']:,} training examples")
        print(f"  startup {rows:,} / 10,000 rows = {big['s'] / small['s']:.2f}   (target <= 1.5)")
        print(f"  peak RSS growth 10,000 -> {rows:,} rows = {(big['peak'] - small['peak']) / mb:.0f} MB   "
              "(target <= 100 MB)")


FSDP_CHILD = r"""
import json, os, statistics, sys, time, torch
from torch.distributed.tensor import DTensor
from stillroom.recipes import load_config
from stillroom.run import distill as train
from stillroom.run import loop
from stillroom.run.loop import clip
out_file, data, how, teacher_shard, accum = sys.argv[1:6]
if os.environ.get("BENCH_OVERLAP") == "0":   # the overlap bench's other arm: every bucket out after the
    from stillroom.run import grads          # backward, in the same order (as before run/grads.py)
    grads.Reducer.arm = lambda self: None
held = {}
real_load = train.load_teachers
def load_teachers(*a, **k):
    held["teachers"] = real_load(*a, **k)
    return held["teachers"]
train.load_teachers = load_teachers
def local(t):
    return t.to_local() if isinstance(t, DTensor) else t
def nbytes(ts):
    return sum(local(t).numel() * local(t).element_size() for t in ts if t is not None)
class Done(BaseException):
    pass
def measure(trainees, objective, batches, *, cfg, accelerator, **kw):
    tr, acc = trainees[0], accelerator
    times, mem = [], {}
    for step in range(6):
        b = batches(step)
        objective.read_ahead(b, objective.plan(step))
        t0 = time.perf_counter()
        loop.train_step(step, b, trainees, objective, cfg, acc)
        clip(acc, tr, 1.0)
        tr.optimizer.step()
        if step == 1:
            params = list(tr.params())
            mem = {"params": nbytes(params), "grads": nbytes([p.grad for p in params]),
                   "optim": nbytes([v for st in tr.optimizer.state.values() for v in st.values()
                                    if torch.is_tensor(v) and v.ndim > 0]),
                   "teacher": nbytes(list(held["teachers"][0].model.parameters()))}
        tr.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if acc.is_main_process:
        json.dump({**mem, "step_s": statistics.median(times[2:]), "world": acc.num_processes}, open(out_file, "w"))
    acc.wait_for_everyone()
    raise Done
loop.fit = measure   # the loop the run session calls
over = [f"data.path={data}", "data.seq_len=256", "train.batch_size=4", f"train.grad_accum={accum}",
        f"train.shard={how}", f"teacher.shard={teacher_shard}", "student.num_layers=6", "eval.max_batches=1",
        "eval.gen_tokens=2", "eval.gen_prompts=1", "data.max_examples=200", "data.skip_bad_rows=true",
        f"train.output_dir={out_file}.run"]
try:
    train.distill(load_config(None, over), overwrite=True, progress=False)
except Done:
    pass
"""


def overlap_bench():
    """Data-parallel step time with the gradients all-reduced during the last backward (run/grads.py)
    against after it, 2 gloo processes, the same runs as the FSDP bench's DDP row, alternated."""
    import os
    import statistics
    import tempfile

    data = SHARED / "alpaca_subset" / "alpaca_4500.jsonl"
    if not data.is_file():
        raise SystemExit(f"the overlap bench trains on {data}, which is not here")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    times = {"during the backward": [], "after the backward": []}
    with tempfile.TemporaryDirectory() as d:
        child = Path(d) / "child.py"
        child.write_text(FSDP_CHILD)
        for i in range(3):
            for name in times:
                out = Path(d) / f"{i}-{len(times[name])}-{name[:5]}.json"
                env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_OVERLAP="0" if "after" in name else "1")
                r = subprocess.run([*launch, str(child), str(out), str(data), "none", "false", "1"],
                                   capture_output=True, text=True, timeout=3600, env=env)
                if r.returncode != 0:
                    raise SystemExit(f"{name}: {r.stderr[-3000:]}")
                times[name].append(json.loads(out.read_text())["step_s"])
    print("\nDDP over 2 gloo processes (a 6-layer student of the bundled teacher, 4 x 256 tokens a process): median "
          "step time (steps 3-6) of 3 runs each, alternated, with the gradients all-reduced bucket by bucket during "
          "the last backward, and after it")
    for name, ts in times.items():
        print(f"  {name:<22} " + "  ".join(f"{t:.3f}" for t in ts) + f"   median {statistics.median(ts):.3f} s")
    a, b = (statistics.median(t) for t in times.values())
    print(f"during / after the backward: {a / b:.3f}")


def fsdp_bench():
    import os
    import tempfile

    data = SHARED / "alpaca_subset" / "alpaca_4500.jsonl"
    if not data.is_file():
        raise SystemExit(f"the FSDP bench trains on {data}, which is not here")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = (("one process", False, "none", "false", 2),
            ("DDP, 2 processes", True, "none", "false", 1),
            ("FSDP2 student, 2 processes", True, "fsdp", "false", 1),
            ("FSDP2 student + teacher, 2 processes", True, "fsdp", "true", 1))
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        child = Path(d) / "child.py"
        child.write_text(FSDP_CHILD)
        for name, several, how, t_shard, accum in runs:
            out = Path(d) / f"{len(rows)}.json"
            cmd = [*(launch if several else [sys.executable]), str(child), str(out), str(data), how, t_shard,
                   str(accum)]
            env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if several else {}))
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
            if r.returncode != 0:
                raise SystemExit(f"{name}: {r.stderr[-3000:]}")
            rows[name] = json.loads(out.read_text())
    mb = 2 ** 20
    own = lambda r: r["params"] + r["grads"] + r["optim"]  # noqa: E731
    base = rows["one process"]
    print("\nFSDP2: per process, the student's params + grads + optimizer state, then + the teacher's params")
    print(f"{'':<38}{'student MB':>11}{'ratio':>7}{'+ teacher MB':>14}{'ratio':>7}{'step s':>9}")
    for name, r in rows.items():
        print(f"{name:<38}{own(r) / mb:>11.1f}{own(r) / own(base):>7.2f}{(own(r) + r['teacher']) / mb:>14.1f}"
              f"{(own(r) + r['teacher']) / (own(base) + base['teacher']):>7.2f}{r['step_s']:>9.2f}")
    f_s, f_t = rows["FSDP2 student, 2 processes"], rows["FSDP2 student + teacher, 2 processes"]
    print(f"FSDP2 / one process, student: {own(f_s) / own(base):.2f}   (target <= 0.6)")
    print(f"FSDP2 / one process, student + teacher: "
          f"{(own(f_t) + f_t['teacher']) / (own(base) + base['teacher']):.2f}   (target <= 0.6)")
    print(f"step time, FSDP2 / DDP (2 processes, the same global batch): "
          f"{f_s['step_s'] / rows['DDP, 2 processes']['step_s']:.2f}")


SHARD_LOAD_CHILD = r"""
import json, sys, threading, time, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
def status(key):
    return [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(key)][0]
from stillroom.models import core as models
from stillroom.run import shard
dist.init_process_group("gloo")
rank = dist.get_rank()
how, spec, out = sys.argv[1:4]
models.load_tokenizer(spec)   # (any GGUF conversion before the count starts)
dist.barrier()
peak, done = [status("RssAnon:")], threading.Event()
start = peak[0]
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon:"))
        time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
from torch.distributed.fsdp import FSDPModule
real_unshard, at_gather = FSDPModule.unshard, {}
def unshard(self, *a, **k):   # the weights are read; the root group is gathered next
    time.sleep(0.01)
    at_gather.update(peak=max(peak[0], status("RssAnon:")) - start, now=status("RssAnon:") - start)
    return real_unshard(self, *a, **k)
FSDPModule.unshard = unshard
if how == "baseline":   # what either load does besides the weights: the tokenizer (again) and the config
    from transformers import AutoConfig
    models.load_tokenizer(spec)
    AutoConfig.from_pretrained(models.resolve(spec)[1])
    time.sleep(0.01)
    json.dump({"peak": max(peak[0], status("RssAnon:")) - start}, open(f"{out}.{rank}", "w"))
    dist.barrier()
    sys.exit(0)
if how == "machinery":   # the sharded load with no weight read or sent (its shards' memory never written)
    shard._scatter = lambda *a, **k: None
if how in ("sharded", "machinery"):
    model = shard.load_teacher(spec, torch.bfloat16, torch.device("cpu")).model
else:   # the path before: every process loads the whole teacher, then it is sharded
    model = models.load(spec, dtype=torch.bfloat16).model
    shard.shard(model, frozen=True)
done.set()
time.sleep(0.01)
peak[0] = max(peak[0], status("RssAnon:"))
full = lambda ps: sum(p.numel() * p.element_size() for p in ps)   # a DTensor's numel is the whole tensor's
layers = [full(layer.parameters()) for layer in shard.decoder_layers(model)]
world = dist.get_world_size()
shards = full(model.parameters()) / world   # this process's shards of every weight
root = full(model.parameters()) - sum(layers)   # embeddings, final norm, head: kept gathered besides
torch.manual_seed(0)
x = torch.randint(0, model.config.vocab_size, (2, 64))
with torch.no_grad():
    got = model(input_ids=x).logits
same = None
if rank == 0 and how != "machinery":   # the same teacher loaded whole in one process (after the measurement)
    ref = models.load(spec, dtype=torch.bfloat16).model
    with torch.no_grad():
        same = bool(torch.equal(ref(input_ids=x).logits, got))
json.dump({"growth": peak[0] - start, "read_peak": at_gather["peak"], "shards": shards, "root": root,
           "layer": max(layers), "whole": full(model.parameters()),
           "tensor": max(p.numel() * p.element_size() for p in model.parameters()), "same": same},
          open(f"{out}.{rank}", "w"))
dist.barrier()
"""


def shard_load_bench(spec: str):
    """teacher.shard=true: what loading the teacher costs each of 2 gloo processes in anonymous
    memory, loaded whole and then sharded (the path before) and sharded as it loads (now): the
    bundled teacher, then a random 4-layer Llama of wide layers (75 MB each in bf16), where one
    layer stands well above the measurement's noise (about 15 MB between repeats)."""
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stillroom.models import core as models

    shard_load_table(spec, spec)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        wide = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=1536, intermediate_size=6144,
                                            num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=12,
                                            tie_word_embeddings=True))
        wide.save_pretrained(d)   # fp32 safetensors
        models.load_tokenizer(spec).save_pretrained(d)
        del wide
        shard_load_table(d, "a random Llama of 4 wide layers (hidden 1536, MLP 6144, vocab 4096)")


def shard_load_table(spec: str, title: str):
    import os
    import tempfile

    mb = 2 ** 20
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        child = Path(d) / "child.py"
        child.write_text(SHARD_LOAD_CHILD)
        for how, name in (("baseline", "baseline"), ("machinery", "machinery"),
                          ("whole", "whole on every process, then sharded (before)"),
                          ("sharded", "sharded as it loads (now)")):
            out = Path(d) / how
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(child),
                                how, spec, str(out)], capture_output=True, text=True, timeout=3600,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode != 0:
                raise SystemExit(f"{how}: {r.stderr[-3000:]}")
            rows[name] = [json.loads(Path(f"{out}.{i}").read_text()) for i in range(2)]
    base, machinery = rows.pop("baseline"), rows.pop("machinery")
    first = next(iter(rows.values()))[0]
    print(f"\nteacher.shard=true: loading {title} in bf16 over 2 gloo processes ({first['whole'] / mb:.0f} MB of "
          f"weights; its largest decoder layer {first['layer'] / mb:.1f} MB, its largest tensor "
          f"{first['tensor'] / mb:.1f} MB)")
    print("per process, the anonymous memory the load added at its peak (sampled every 1 ms): while the weights "
          "are read (up to the root group's gather), its excess over the process's shards of every weight and over "
          f"what the load does besides the weights (before: a tokenizer and the config, {base[0]['peak'] / mb:.0f} MB; "
          f"now: the same sharded load with nothing read or sent, {machinery[0]['read_peak'] / mb:.0f} MB on "
          f"the main process: FSDP2's and gloo's own), and "
          "at the end (the root group, embeddings and head, which a sharded teacher keeps gathered beside its shards, "
          "and FSDP2's buffer for that gather)")
    print(f"{'':<48}{'rank':>5}{'shards MB':>10}{'reading: peak':>14}{'excess':>8}{'excess / layer':>16}"
          f"{'end: peak MB':>14}{'logits == 1 process':>21}")
    for name, per in rows.items():
        for i, r in enumerate(per):
            ex = r["read_peak"] - (machinery[i]["read_peak"] if "now" in name else base[i]["peak"]) - r["shards"]
            print(f"{name:<48}{i:>5}{r['shards'] / mb:>10.0f}{r['read_peak'] / mb:>14.0f}{ex / mb:>8.0f}"
                  f"{ex / r['layer']:>16.2f}{r['growth'] / mb:>14.0f}{'' if r['same'] is None else str(r['same']):>21}")
    now = rows["sharded as it loads (now)"]
    before = rows["whole on every process, then sharded (before)"]
    print("sharded as it loads / whole then sharded, peak per process: "
          + ", ".join(f"rank {i} {a['growth'] / b['growth']:.2f}" for i, (a, b) in enumerate(zip(now, before))))
    print(f"the root group gathered: {first['root'] / mb:.0f} MB per process, in both")
    print("target (issue 29): while reading, at most one decoder layer's full weights beyond the shards "
          "(excess / layer <= 1)")


def lean_bench():
    import statistics
    import time

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from kd_step import LiveBytes

    from stillroom.losses import Head
    from stillroom.losses.kernel import linear_mixed_loss
    from stillroom.losses.kernel import auto_chunk_rows

    H, mb = 576, 2 ** 20
    print("\nlean loss, forward + backward, one sequence, every position labelled")
    print(f"{'vocab':>8}{'seq':>6}{'chunk rows':>11}{'us / token':>11}{'extra peak MB':>14}{'per chunk row KB':>17}")
    for V in (49152, 262144):
        g = torch.Generator().manual_seed(0)
        ws = (torch.randn(V, H, generator=g) * 0.02).requires_grad_(True)
        wt = torch.randn(V, H, generator=g) * 0.02
        chunk = auto_chunk_rows(V)
        for seq in (256, 1024, 4096):
            hs = torch.randn(1, seq, H, generator=g).requires_grad_(True)
            ht = torch.randn(1, seq, H, generator=g)
            labels = torch.randint(0, V, (1, seq), generator=g)

            def step():
                loss = linear_mixed_loss(hs, ws, [(Head(ht, wt), 0.9)], labels, ce_weight=0.1, temperature=2.0)
                loss.backward()
                hs.grad = ws.grad = None

            step()   # warm
            times = []
            for _ in range(1 if seq * V > 2 ** 28 else 3):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            with LiveBytes(hs, ws, ht, wt, labels) as mode:
                step()
            grads = (seq * H + V * H) * 4   # the gradients it returns: hidden states and head weight
            extra = mode.peak - grads
            print(f"{V:>8,}{seq:>6}{chunk:>11}{statistics.median(times) / seq * 1e6:>11.1f}{extra / mb:>14.1f}"
                  f"{extra / chunk / 1024:>17.1f}")


def main():
    import tempfile

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", choices=["loading", "data", "fsdp", "overlap", "shard-load", "lean"])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the large data set (startup, RSS)")
    a = ap.parse_args()
    import transformers
    transformers.utils.logging.disable_progress_bar()
    if a.only in (None, "data"):
        data_bench(a.model, a.rows)
    if a.only in (None, "fsdp"):
        fsdp_bench()
    if a.only in (None, "overlap"):
        overlap_bench()
    if a.only in (None, "shard-load"):
        shard_load_bench(a.model)
    if a.only in (None, "lean"):
        lean_bench()
    if a.only in ("data", "fsdp", "overlap", "shard-load", "lean"):
        return
    measure("tokenizer", a.model)   # converts a GGUF teacher once, so no row pays for it
    print("RSS growth: peak RSS (VmHWM) less the tokenizer-only process's; it counts the weight files' pages "
          "read through mmap (page cache, reclaimable). anon peak: the largest anonymous memory growth during "
          "the load, sampled every 2 ms (what can exhaust a machine); the tokenizer-only row's (the tokenizer "
          "is loaded with the model) is taken off before dividing by the weights.")
    table(a.model, f"{a.model}, its folder as stored (the bundled teacher's: fp32 safetensors)")
    from stillroom.models import core as models
    with tempfile.TemporaryDirectory() as d:   # most Hugging Face checkpoints are stored in bf16
        m = models.load(a.model, dtype=torch.bfloat16)
        m.model.save_pretrained(d)
        m.tokenizer.save_pretrained(d)
        del m
        table(d, f"{a.model}, saved as bf16 safetensors (as most Hugging Face checkpoints are)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    results.main(main, "scale", "At scale (bench/scale.py)")
