"""A teacher you can only call: an OpenAI-compatible chat-completions endpoint.

    stillroom generate --api http://127.0.0.1:8080/v1 --api-model NAME --prompts p.jsonl --out a.jsonl
        [--top-logprobs 20] [--concurrency 4] [--rate-limit 2] [--api-key-env OPENAI_API_KEY]

Text only: the answers are sequence-level hard-label data (train on them with loss.alpha=0).
With --top-logprobs K each row also keeps, per generated token, the token, its log-prob and the
endpoint's top-K alternatives (`teacher_logprobs`). `stillroom cache ... cache.source=logprobs`
turns those rows into a teacher cache on the student's tokenization, when the tokenizers match:
soft labels from an API.

Requests go through the official `openai` client (its retries with exponential backoff honour
Retry-After on 429 and 5xx); --concurrency requests run at once, --rate-limit caps requests per
second. A request that still fails stops the run with one line; what was written stays, and the
same command continues from there (generate's progress record).
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stillroom.errors import UserError

log = logging.getLogger("stillroom")


class ApiTeacher:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 rate_limit: float = 0.0, top_logprobs: int = 0, max_retries: int = 6, timeout: float = 600.0,
                 tokenizer=None):
        try:
            import openai
        except ImportError:
            raise UserError("an API teacher needs the openai client: pip install 'stillroom[api]'") from None
        if top_logprobs < 0 or top_logprobs > 20:
            raise UserError(f"--top-logprobs must be in 0..20 (the OpenAI API's limit), got {top_logprobs}")
        self.openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none",
                                    max_retries=max_retries, timeout=timeout)
        self.model, self.base_url = model, base_url
        self.source = f"api:{base_url}:{model}" + (f":top{top_logprobs}" if top_logprobs else "")
        self.concurrency, self.top_logprobs, self.tokenizer = max(1, concurrency), top_logprobs, tokenizer
        self.interval = 1.0 / rate_limit if rate_limit > 0 else 0.0
        self._lock, self._next = threading.Lock(), 0.0

    def prompt_tokens(self, conv) -> int:
        if self.tokenizer is None:
            raise UserError("--max-prompt-tokens with --api needs --tokenizer (a model folder or name whose "
                            "tokenizer counts the tokens)")
        text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _throttle(self):
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            time.sleep(wait)

    def _one(self, conv, gcfg, seed: int):
        self._throttle()
        kw = dict(model=self.model, messages=conv, max_tokens=gcfg.max_new_tokens, seed=seed,
                  temperature=gcfg.temperature, top_p=gcfg.top_p)
        if gcfg.top_k:
            kw["extra_body"] = {"top_k": gcfg.top_k}
        if self.top_logprobs:
            kw.update(logprobs=True, top_logprobs=self.top_logprobs)
        try:
            r = self.client.chat.completions.create(**kw)
        except self.openai.APIConnectionError as e:
            raise UserError(f"cannot reach the API at {self.base_url} ({e.__class__.__name__}) after retries; "
                            "what was written is kept: run the same command again to continue") from None
        except self.openai.APIStatusError as e:
            raise UserError(f"the API at {self.base_url} answered {e.status_code}: {str(e.message)[:200]}; "
                            "what was written is kept: run the same command again to continue") from None
        choice = r.choices[0]
        text = choice.message.content or ""
        cut = {"truncated": True} if choice.finish_reason == "length" else {}   # stopped by max_tokens
        if not self.top_logprobs:
            return {"content": text, **cut} if cut else text
        content = (choice.logprobs.content if choice.logprobs else None) or []
        if not content:
            raise UserError(f"the API at {self.base_url} returned no logprobs: it does not support "
                            "logprobs/top_logprobs; drop --top-logprobs for text-only answers")
        lp = [{"token": c.token, "logprob": c.logprob,
               "top": [[x.token, x.logprob] for x in (c.top_logprobs or [])]} for c in content]
        return {"content": text, "teacher_logprobs": lp, **cut}

    def answer(self, convs: list[list[dict]], gcfg, seed: int) -> list[list]:
        """Every (conversation, answer number) as its own request, `concurrency` at a time; the
        seed of answer j to prompt i is gcfg.seed + (seed + i) * num_answers + j (reproducible)."""
        n = gcfg.num_answers
        jobs = [(i, j) for i in range(len(convs)) for j in range(n)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            got = list(pool.map(lambda ij: self._one(convs[ij[0]], gcfg, gcfg.seed + (seed + ij[0]) * n + ij[1]),
                                jobs))
        return [got[i * n:(i + 1) * n] for i in range(len(convs))]


# ------------------------------------------------------------------------------------ logprobs -> cache

def _pieces(tok) -> dict[str, int]:
    """Decoded text of every token id -> the id; pieces that several ids share are left out."""
    seen, out = set(), {}
    for i in range(len(tok)):
        p = tok.decode([i], clean_up_tokenization_spaces=False)
        if p in seen:
            out.pop(p, None)
        else:
            seen.add(p)
            out[p] = i
    return out


def _spare_ids(used: set, k: int, vocab: int) -> list[int]:
    out, v = [], 0
    while len(out) < k and v < vocab:
        if v not in used:
            out.append(v)
        v += 1
    return out


def rows_from_logprobs(path: Path, tok, seq_len: int, k: int):
    """Read generate's JSONL with `teacher_logprobs`; yield (Example, list of per-loss-position
    targets (ids, logps) or None for a one-hot on the true token), plus counts of what aligned.

    Alignment: the last assistant turn's label tokens, rendered and tokenized as the data loader
    does, must decode to exactly the endpoint's token strings; then position j's target is the
    endpoint's top list for token j (mapped to ids by their text; text that no single id has goes
    to the tail bucket). Positions past the endpoint's tokens (end of turn) and rows that do not
    align get the true token as a one-hot target (hard label), and are counted."""
    from stillroom.data.examples import Example
    from stillroom.data.render import render_chat
    from stillroom.data.rows import read_jsonl
    from stillroom.teachers.cache import positions

    pieces = _pieces(tok)
    rows, bad = read_jsonl(Path(path))
    if bad:
        raise UserError(f"{path} line {bad[0][0]}: {bad[0][1]}")
    stats = {"rows": 0, "aligned": 0, "soft_positions": 0, "hard_positions": 0}
    for n, row in rows:
        lp, msgs = row.get("teacher_logprobs"), row.get("messages")
        if not isinstance(lp, list) or not isinstance(msgs, list):
            raise UserError(f"{path} row {n}: needs 'messages' and 'teacher_logprobs' "
                            "(stillroom generate --api ... --top-logprobs K)")
        ids, labels = render_chat(tok, msgs)
        ids, labels = ids[:seq_len], labels[:seq_len]
        e = Example(ids, labels)
        pos = positions(e)
        if not pos:
            continue
        stats["rows"] += 1
        # the last contiguous block of labelled tokens is the final assistant turn
        lab = [i for i, y in enumerate(labels) if y != -100]
        labelled, start = set(lab), lab[-1]
        while start - 1 in labelled:
            start -= 1
        span = [i for i in lab if i >= start]
        api_tokens = [c["token"] for c in lp]
        mine = [tok.decode([ids[i]], clean_up_tokenization_spaces=False) for i in span[:len(api_tokens)]]
        aligned = mine == api_tokens[:len(mine)] and len(mine) > 0
        stats["aligned"] += aligned
        target_at = {}
        if aligned:
            for j, i in enumerate(span[:len(api_tokens)]):
                top = {}
                for t, v in lp[j]["top"] + [[lp[j]["token"], lp[j]["logprob"]]]:
                    if t in pieces and v is not None and math.isfinite(v):
                        top[pieces[t]] = v
                top = sorted(top.items(), key=lambda x: -x[1])[:k]
                target_at[i] = top
        targets = []
        for p in pos:
            t = target_at.get(p + 1)
            stats["soft_positions" if t else "hard_positions"] += 1
            targets.append(t)
        yield e, targets, stats


def build_from_logprobs(cfg, tok, model_config=None, overwrite=False, progress=True) -> dict:
    """A teacher cache (teachers/cache.py's format) from generate's `teacher_logprobs` rows, on the
    tokenizer of cfg.teacher.model (which must be the endpoint's). Label log-probs (the teacher's
    perplexity in the eval) are exact where the true token is listed, else the tail mass (an
    upper bound)."""
    from stillroom.teachers.cache import ShardWriter, positions, sample_id, start_import, write_json

    out, k = Path(cfg.cache.path), cfg.cache.top_k
    index = start_import(cfg, tok, model_config, overwrite, f"logprobs in {cfg.data.path}", cfg.cache.dtype)
    writer, stats, done = ShardWriter(out, index, cfg.cache.shard_rows), {}, set()
    for e, targets, stats in tqdm(rows_from_logprobs(cfg.data.path, tok, cfg.data.seq_len, k),
                                  desc="logprobs -> cache", unit="row", disable=not progress):
        sid = sample_id(e)
        if sid in done:
            continue
        done.add(sid)
        ids = torch.zeros(len(targets), k, dtype=torch.int32)
        logp = torch.full((len(targets), k), float("-inf"))
        tail = torch.full((len(targets),), float("-inf"))
        label_logp = torch.zeros(len(targets))
        for r, (p, t) in enumerate(zip(positions(e), targets)):
            true = e.labels[p + 1]
            if not t:
                t = [(true, 0.0)]     # hard label: all mass on the true token
            used = {i for i, _ in t}
            spare = _spare_ids(used, k - len(t), len(tok))
            ids[r] = torch.tensor([i for i, _ in t] + spare, dtype=torch.int32)
            logp[r, :len(t)] = torch.tensor([v for _, v in t])
            mass = sum(math.exp(v) for _, v in t)
            tail[r] = math.log(1 - mass) if mass < 1 - 1e-6 else float("-inf")
            label_logp[r] = dict(t).get(true, math.log(max(1 - mass, 1e-12)))
        writer.add(sid, ids, logp, tail, label_logp)
        writer.flush_if_full()
    writer.flush()
    if not index["shards"]:
        raise UserError(f"no rows with teacher_logprobs in {cfg.data.path}")
    index["complete"] = True
    index["logprobs"] = stats
    write_json(out / "index.json", index)
    log.info("%d rows: %d aligned with the tokenizer; %d positions with soft labels, %d with the true token",
             stats["rows"], stats["aligned"], stats["soft_positions"], stats["hard_positions"])
    return index


__all__ = ["ApiTeacher", "build_from_logprobs", "rows_from_logprobs"]
