"""The student as its teacher's draft model (speculative decoding with transformers' assisted
generation): on the same prompts, the teacher's greedy decode alone vs with the student drafting.

Assisted greedy decoding is exact: each step the student proposes `draft_tokens` tokens, the
teacher scores them in one pass and keeps the longest prefix that equals its own argmax, plus one
token of its own. So the output must equal the teacher's plain greedy output; `identical` checks
it per prompt (float rounding between a one-token and a many-token pass can flip a near-tie: that
is counted, not hidden).

Accounting, from forward hooks on both models (no reliance on transformers' internals):
- steps: the teacher's passes during the assisted decode (one verification per step);
- proposed: the student's passes (one drafted token each);
- accepted: tokens produced - steps (each step yields its accepted draft tokens plus one of the
  teacher's own; a last step cut short by max_new_tokens makes this a slight undercount).
"""
from __future__ import annotations

import copy
import logging
import time

import torch

from stillroom.run.feedback import bar

log = logging.getLogger("stillroom")


class _Count:
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


@torch.no_grad()
def draft_check(teacher, student, prompts_ids: list[list[int]], new_tokens: int, pad_id: int,
                draft_tokens: int = 5, who: str = "the student") -> dict:
    """Greedy decode of each prompt by the teacher alone and with the student drafting (batch 1,
    one untimed warm-up of each first). -> acceptance, speed ratio and the identity check; a
    warning names `who` when an output differed."""
    was = teacher.training, student.training
    teacher.eval()
    student.eval()
    device = next(teacher.parameters()).device
    kw = dict(max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
              pad_token_id=pad_id)
    assisted = {"assistant_model": student}
    # transformers reads the draft settings from the assistant's own generation config: a fixed
    # draft length (no heuristic schedule, no early stop on the student's confidence), restored after
    saved = student.generation_config
    student.generation_config = copy.deepcopy(saved)
    student.generation_config.update(num_assistant_tokens=draft_tokens, num_assistant_tokens_schedule="constant",
                                     assistant_confidence_threshold=0.0)
    try:
        d = _check(teacher, student, prompts_ids, draft_tokens, device, kw, assisted)
    finally:
        student.generation_config = saved
        teacher.train(was[0])
        student.train(was[1])
    if not d["all_identical"]:
        log.warning("with %s drafting, the teacher's greedy output differed on %d of %d prompts (float "
                    "rounding between one-token and many-token passes flips near-ties)", who,
                    d["prompts"] - d["identical"], d["prompts"])
    return d


def _check(teacher, student, prompts_ids, draft_tokens, device, kw, assisted) -> dict:

    def decode(x, extra):
        t0 = time.perf_counter()
        out = teacher.generate(x, attention_mask=torch.ones_like(x), **kw, **extra)
        return out[0, x.shape[1]:].tolist(), time.perf_counter() - t0

    warm = torch.tensor([prompts_ids[0]], device=device)
    decode(warm, {})
    decode(warm, assisted)
    totals = {"tokens": 0, "steps": 0, "proposed": 0, "plain_s": 0.0, "draft_s": 0.0, "identical": 0}
    for ids in bar(prompts_ids, desc="draft check", unit="prompt"):
        x = torch.tensor([ids], device=device)
        plain, t_plain = decode(x, {})
        t_count, s_count = _Count(teacher), _Count(student)
        try:
            drafted, t_draft = decode(x, assisted)
        finally:
            t_count.handle.remove()
            s_count.handle.remove()
        totals["tokens"] += len(drafted)
        totals["steps"] += t_count.n
        totals["proposed"] += s_count.n
        totals["plain_s"] += t_plain
        totals["draft_s"] += t_draft
        totals["identical"] += plain == drafted
    accepted = max(0, totals["tokens"] - totals["steps"])
    return {"prompts": len(prompts_ids), "new_tokens": totals["tokens"], "draft_tokens": draft_tokens,
            "teacher_steps": totals["steps"], "proposed": totals["proposed"], "accepted": accepted,
            "accepted_per_step": accepted / max(totals["steps"], 1),
            "acceptance_rate": accepted / totals["proposed"] if totals["proposed"] else 0.0,
            "tokens_per_teacher_pass": totals["tokens"] / max(totals["steps"], 1),
            "speedup": totals["plain_s"] / totals["draft_s"] if totals["draft_s"] else None,
            "identical": totals["identical"], "all_identical": totals["identical"] == len(prompts_ids)}


def table(d: dict) -> str:
    rows = [("prompts (greedy, batch 1)", f"{d['prompts']}"),
            ("tokens generated", f"{d['new_tokens']}"),
            ("student draft length", f"{d['draft_tokens']}"),
            ("accepted draft tokens / teacher step", f"{d['accepted_per_step']:.2f}"),
            ("acceptance rate", f"{d['acceptance_rate']:.1%}"),
            ("tokens per teacher pass", f"{d['tokens_per_teacher_pass']:.2f}"),
            ("speed with draft / teacher alone", f"{d['speedup']:.2f}x" if d["speedup"] else "-"),
            ("output identical to the teacher's", f"{d['identical']}/{d['prompts']}")]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b:>10}" for a, b in rows)
