"""The teacher answers prompts: prompts in, JSONL conversations out (resumable).

The output is chat data (`{"messages": [user, assistant]}` per line) that `stillroom distill`
trains on directly: soft labels when the teacher is also present at training time, or plain CE on
the teacher's text for sequence-level hard-label distillation (Kim & Rush 2016).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UserError

log = logging.getLogger("stillroom")

BUNDLED_PROMPTS = Path(__file__).parent / "assets" / "instructions.txt"


def read_prompts(path: str | Path | None, limit: int | None = None) -> list[str]:
    """A .txt file (one prompt per line) or JSONL with a `prompt` key; None = the bundled set."""
    p = Path(path) if path else BUNDLED_PROMPTS
    if not p.is_file():
        raise UserError(f"prompts file not found: {p}")
    prompts = []
    if p.suffix in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p} line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f"{p} line {n}: needs a string 'prompt'")
            prompts.append(row["prompt"])
    else:
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {p} is empty")
    return prompts[:limit] if limit else prompts


def _done_rows(out: Path, prompts: list[str]) -> int:
    """How many prompts `out` already answers; drops a torn last line left by a crash."""
    if not out.exists():
        return 0
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    good = []
    for line in lines:
        try:
            row = json.loads(line)
            good.append(row["messages"][0]["content"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            break
    if good != prompts[:len(good)]:
        raise UserError(f"{out} holds answers to other prompts; choose another output file or delete it")
    if len(good) < len(lines):  # torn tail: rewrite the file with the complete rows only
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text("".join(lines[:len(good)]), encoding="utf-8")
        os.replace(tmp, out)
    return len(good)


def answer(model, tokenizer, prompts: list[str], gcfg, batch_seed: int = 0) -> list[str]:
    """Batched generation (left padding) with the chat template; greedy when temperature == 0."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    enc = {k: v.to(model.device) for k, v in enc.items()}
    sample = gcfg.temperature > 0
    torch.manual_seed(gcfg.seed + batch_seed)
    kwargs = dict(do_sample=sample, max_new_tokens=gcfg.max_new_tokens,
                  pad_token_id=tokenizer.pad_token_id)
    if sample:
        kwargs.update(temperature=gcfg.temperature, top_p=gcfg.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def generate_file(model, tokenizer, prompts: list[str], out: Path, gcfg, progress: bool = True) -> Path:
    """Answer every prompt not yet answered in `out`, appending one JSON line per prompt."""
    if not tokenizer.chat_template:
        raise UserError("the teacher's tokenizer has no chat template; generate needs one")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = _done_rows(out, prompts)
    if start == len(prompts):
        return out
    bar = tqdm(total=len(prompts), initial=start, desc="teacher answers", unit="prompt",
               disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        for a in range(start, len(prompts), gcfg.batch_size):
            batch = prompts[a:a + gcfg.batch_size]
            for p, r in zip(batch, answer(model, tokenizer, batch, gcfg, batch_seed=a)):
                f.write(json.dumps({"messages": [{"role": "user", "content": p},
                                                 {"role": "assistant", "content": r}]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return out
