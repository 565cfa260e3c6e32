"""One KD training step, side by side, in one process, on the same batch.

    python bench/kd_step.py [--batch 4] [--seq 256] [--rounds 3] [--chunk-rows 64]

Teacher: the bundled SmolLM2-135M-Instruct (fp32). Student: 4 layers, hidden 256, the teacher's
vocabulary (49152), random init. Batch: 4 x 256 tokens of real text (../shared/data/tinystories if
present, else the bundled instructions). Rows, each a full optimizer step (forward, loss, backward,
AdamW step):

  teacher fwd       the teacher's forward pass alone (no autograd)
  student CE        the student's plain CE step (transformers' built-in loss)
  stillroom KD      teacher fwd + student step with stillroom's chunked soft-KD hybrid loss
  naive KD          teacher fwd + student step with a textbook full-logit KD loss (F.kl_div)

Timings: the median of --rounds interleaved rounds after one warm-up (the machine is noisy, so
compare the ratios, not the absolute seconds). Loss memory: peak bytes the allocator holds while
the loss alone runs forward + backward, beyond what existed before it (the logits themselves are
inputs, not counted; a gradient w.r.t. the logits that takes new memory is, while stillroom's,
written into the logits' own storage as in the training loop, takes none), measured on CPU by tracking every tensor
storage the loss creates (a TorchDispatchMode, sampled after each op) and on GPU with
torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import sys
import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stillroom.config import StudentConfig
from stillroom.losses import distill_loss, hybrid, shift_labels
from stillroom.models import core as models

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"


def batch_tokens(tok, batch, seq):
    if SHARED.is_file():
        text, source = SHARED.read_text(), str(SHARED)
    else:
        from stillroom.teachers.generate import BUNDLED_PROMPTS
        text, source = BUNDLED_PROMPTS.read_text() * 20, "bundled instructions"
    ids = tok(text, add_special_tokens=False)["input_ids"][: batch * seq]
    assert len(ids) == batch * seq, "not enough text for the batch"
    return torch.tensor(ids).view(batch, seq), source


def naive_kd(s_logits, t_logits, labels, alpha, T):
    """The textbook version: full-size fp32 log-probs of both models, then mean-free sums."""
    mask = labels != -100
    log_q = F.log_softmax(s_logits.float() / T, dim=-1)
    log_p = F.log_softmax(t_logits.float() / T, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy(s_logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return alpha * T * T * (kl * mask).sum() + (1 - alpha) * ce.sum()


def stillroom_kd(s_logits, t_logits, labels, alpha, T, chunk):
    # as in the training loop: the gradient is written into the logits' storage
    return distill_loss(s_logits, t_logits, labels, hybrid(alpha, "soft"), T, chunk=chunk, inplace_grad=True)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive, sampled after every op;
    `peak` is the maximum. Storages that existed before (the logits) are not counted."""

    def __init__(self, *existing):
        super().__init__()
        self.ignore = {StorageWeakRef(x.untyped_storage()).cdata for x in existing}
        self.refs, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.ignore and ref.cdata not in self.refs:
                    self.refs[ref.cdata] = (ref, t.untyped_storage().nbytes())
        live = 0
        for key, (ref, n) in list(self.refs.items()):
            if ref.expired():
                del self.refs[key]
            else:
                live += n
        self.peak = max(self.peak, live)
        return out


class AllocatorPeak:
    """Peak bytes the CPU allocator holds for allocations made inside the block (beyond what
    existed before it), from torch.profiler's memory timeline: every allocation counts, those of
    a compiled (Inductor) kernel and an op's own temporaries included, which a dispatch mode
    (`LiveBytes`) does not see. `_memory_profile` is a private API of torch.profiler (2.13)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                            with_stack=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        live, self.peak = 0, 0
        for _, action, _, size in self.prof._memory_profile().timeline:
            if action.name == "CREATE":
                live += size
            elif action.name == "DESTROY":
                live -= size
            self.peak = max(self.peak, live)
        return False


def loss_peak_bytes(fn, s_logits, t_logits, labels):
    """Peak extra bytes held while `fn` runs forward + backward on given logits. A gradient
    w.r.t. the logits in new memory counts; one written into the logits' storage does not."""
    s = s_logits.detach().clone().requires_grad_(True)
    if s.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(s, t_logits, labels).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with LiveBytes(s, t_logits, labels) as mode:
        fn(s, t_logits, labels).backward()
    return mode.peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=2.0)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    teacher = models.load("smollm2-135m")
    tm, tok = teacher.model.to(dev), teacher.tokenizer
    student = models.student_from_config(tm, StudentConfig(init="config", hidden_size=256, num_layers=4,
                                                           num_heads=4)).to(dev)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids, source = batch_tokens(tok, args.batch, args.seq)
    ids = ids.to(dev)
    labels = shift_labels(ids)
    a, T, chunk = args.alpha, args.temperature, args.chunk_rows

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def teacher_fwd():
        with torch.no_grad():
            return tm(input_ids=ids, use_cache=False).logits

    def ce_step():
        loss = student(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def kd_step(loss_fn):
        t = teacher_fwd()
        s = student(input_ids=ids, use_cache=False).logits
        loss = loss_fn(s, t, labels)
        (loss / int((labels != -100).sum())).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ours = lambda s, t, y: stillroom_kd(s, t, y, a, T, chunk)  # noqa: E731
    naive = lambda s, t, y: naive_kd(s, t, y, a, T)  # noqa: E731
    rows = {"teacher fwd": teacher_fwd, "student CE": ce_step,
            "stillroom KD": lambda: kd_step(ours), "naive KD": lambda: kd_step(naive)}
    times = {k: [] for k in rows}
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        for name, fn in rows.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    with torch.no_grad():
        t_logits = teacher_fwd()
        s_logits = student(input_ids=ids, use_cache=False).logits
    mem = {"stillroom KD": loss_peak_bytes(ours, s_logits, t_logits, labels),
           "naive KD": loss_peak_bytes(naive, s_logits, t_logits, labels)}
    # The two losses agree (same formula), so the comparison is like for like.
    with torch.no_grad():
        v_ours, v_naive = ours(s_logits, t_logits, labels).item(), naive(s_logits, t_logits, labels).item()
    # (no_grad: the loss needs no gradient, so inplace_grad leaves s_logits untouched)

    tokens = ids.numel()
    print(f"device {dev}; batch {args.batch} x {args.seq} tokens from {source}; teacher {models.num_params(tm):,} "
          f"params; student {models.num_params(student):,} params (4 layers, hidden 256); vocab {s_logits.shape[-1]}; "
          f"alpha {a}, T {T}, chunk_rows {chunk}; median of {args.rounds} rounds")
    print(f"loss values agree: stillroom {v_ours:.4f} vs naive {v_naive:.4f}")
    print(f"{'step':<14}{'s/step':>9}{'tokens/s':>11}{'loss extra peak MB':>20}")
    for k in rows:
        m = f"{mem[k] / 2**20:.0f}" if k in mem else "-"
        print(f"{k:<14}{med[k]:>9.3f}{tokens / med[k]:>11.0f}{m:>20}")
    base = med["teacher fwd"] + med["student CE"]
    print(f"\nstillroom KD / (teacher fwd + student CE) = {med['stillroom KD'] / base:.3f}   (target <= 1.10)")
    print(f"naive KD     / (teacher fwd + student CE) = {med['naive KD'] / base:.3f}")
    print(f"stillroom KD / naive KD time              = {med['stillroom KD'] / med['naive KD']:.3f}")
    print(f"loss extra memory, stillroom / naive      = {mem['stillroom KD'] / mem['naive KD']:.3f}   (target < 0.25)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    results.main(main, "kd_step", "A KD step: CE vs stillroom vs naive (bench/kd_step.py)")
