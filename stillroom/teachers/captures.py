"""Logit captures made by other tools, read into a stillroom cache.

vLLM (`cache.source=vllm`): JSON Lines, one row per sequence, as vLLM gives them (offline
`LLM.generate(..., SamplingParams(prompt_logprobs=k))` dumped, or the OpenAI-compatible server's
`choices[0].prompt_logprobs`):

    {"prompt_token_ids": [ids...], "prompt_logprobs": [null, {"<id>": {"logprob": -0.1, "rank": 1,
     "decoded_token": "..."}, ...}, ...], "labels": [optional: -100 where no loss]}

Entry i is the distribution of token i given the tokens before it (entry 0 is null): k entries
ranked 1..k, plus the realized token with its own rank when it is outside them. `input_ids` may
stand for `prompt_token_ids`. The rows themselves are the training data: `stillroom distill
teacher.kind=cache teacher.cache=DIR` reads them (pre-tokenized rows are used as they are), so every
sample finds its targets by content. A capture holds no tail mass: it is log(1 - sum of the listed
probabilities). Its log-probs are taken to be at temperature 1 (vLLM's raw log-probs).

axolotl (`cache.source=axolotl`): axolotl's KD datasets, JSON Lines of `input_ids` (optional
`labels`) and per-position top-k rows right-aligned to the end of input_ids: row r is the
distribution of the token at position len(input_ids) - len(rows) + r (a longer list describes
tokens 0, 1, ... from the start). Two layouts: `target_token_ids` [pos][k] beside `logprobs`
[pos][k] (floats), or the older `logprobs` [pos][k] of {"token": "token_id:<id>", "logprob": v}.
axolotl's rows do not list the realized token outside the top-k: its log-prob there is the tail's
log-mass (an upper bound), as for an API's logprobs.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stillroom.errors import UserError

log = logging.getLogger("stillroom")


def axolotl_entries(row: dict, n: int, fail) -> list[dict | None]:
    """An axolotl KD row's top-k for its n tokens -> per token {id: log-prob}, highest first (as
    prompt_logprobs_entries gives vLLM's); {} where the row says nothing, None for token 0."""
    rows, ids = row.get("logprobs"), row.get("target_token_ids")
    if not isinstance(rows, list) or not rows:
        raise fail("no logprobs (an axolotl KD row has logprobs, with target_token_ids or as token_id entries)")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(rows)):
        raise fail(f"target_token_ids has {len(ids) if isinstance(ids, list) else 0} positions, logprobs {len(rows)}")
    start = max(n - len(rows), 0)   # right-aligned; a longer list starts at token 0
    out = [None] + [{} for _ in range(n - 1)]
    for r, lp in enumerate(rows):
        p = start + r
        if p >= n:
            break
        if p == 0 or not lp:
            continue
        try:
            if ids is None:   # [{"token": "token_id:123", "logprob": -0.1}, ...]
                pairs = [(int(str(x["token"]).split(":")[-1]), float(x["logprob"])) for x in lp]
            else:
                pairs = [(int(t), float(v)) for t, v in zip(ids[r], lp, strict=True)]
        except (KeyError, TypeError, ValueError, IndexError):
            raise fail(f"a logprobs row it cannot read at token {p}") from None
        out[p] = dict(sorted(pairs, key=lambda x: -x[1] if not math.isnan(x[1]) else math.inf))
    return out


def import_capture(cfg, tok, model_config=None, overwrite=False, progress=True) -> dict:
    """A stillroom cache (teachers/cache.py's format) from another tool's capture at cfg.data.path
    (cache.source: vllm or axolotl), on teacher.model's tokenizer (which must be the one the
    capture was made with)."""
    from stillroom.data.examples import Example, row_doc
    from stillroom.data.rows import read_jsonl
    from stillroom.teachers.cache import ShardWriter, sample_id, start_import, write_json
    from stillroom.teachers.served import prompt_logprobs_entries, target_rows

    path, out, k, fmt = Path(cfg.data.path), Path(cfg.cache.path), cfg.cache.top_k, cfg.cache.source
    field, what = {"vllm": ("prompt_logprobs", "prompt_token_ids (or input_ids) and prompt_logprobs (a vLLM capture)"),
                   "axolotl": ("logprobs", "input_ids and logprobs (an axolotl KD row)")}[fmt]
    if cfg.data.pack:
        raise UserError(f"cache.source={fmt}: a capture's rows are its examples; set data.pack=false (here and in "
                        "the runs that read the cache)")
    rows, bad = read_jsonl(path)
    if bad:
        raise UserError(f"{path} line {bad[0][0]}: {bad[0][1]}")
    index = start_import(cfg, tok, model_config, overwrite, f"{fmt} {field} in {path}", cfg.cache.dtype)
    writer, done, used = ShardWriter(out, index, cfg.cache.shard_rows), set(), 0
    dtype = {"float16": torch.float16, "float32": torch.float32}[cfg.cache.dtype]
    for n, row in tqdm(rows, desc=f"{fmt} capture -> cache", unit="row", disable=not progress):
        if not isinstance(row, dict) or field not in row:
            raise UserError(f"{path} row {n}: needs {what}")
        got = row_doc(row, tok, cfg.data)
        if got[0] == "bad":
            raise UserError(f"{path} row {n}: {got[1]}")
        if got[0] != "example":
            continue
        e = Example(got[1], got[2])
        sid = sample_id(e)
        if sid in done:
            continue
        done.add(sid)

        def fail(what, n=n):
            return UserError(f"{path} row {n}: {what}")
        raw = (prompt_logprobs_entries(row["prompt_logprobs"], len(e.input_ids), fail) if fmt == "vllm"
               else axolotl_entries(row, len(e.input_ids), fail))
        ids, logp, tail, label_logp = target_rows(e, raw, k, fail)
        if int(ids.max()) >= len(tok):
            raise UserError(f"{path} row {n}: token id {int(ids.max())} is outside {cfg.teacher.model}'s "
                            f"vocabulary ({len(tok)}): the capture was made with another tokenizer")
        writer.add(sid, ids.to(torch.int32), logp.to(dtype), tail.float(), label_logp.float())
        writer.flush_if_full()
        used += 1
    writer.flush()
    if not used:
        raise UserError(f"no row of {path} has a position to learn from (seq_len {cfg.data.seq_len})")
    index["complete"] = True
    write_json(out / "index.json", index)
    log.info("%d rows of %s in the cache %s", used, path, out)
    return index


def export_capture(cfg, out: Path, fmt: str, progress=True) -> int:
    """The cache at teacher.cache as another tool's capture, one JSONL row per example of its data
    (the config's, or what the cache was built from), with `labels`. fmt vllm: `prompt_token_ids`
    and `prompt_logprobs` (entry i + 1 holds position i's stored top-k with ranks 1..k, and the true
    token's log-prob when it is not among them, its rank unknown: null; tokens without a loss: an
    empty entry). fmt axolotl: `input_ids`, `target_token_ids` and `logprobs` (axolotl's KD layout:
    a row per token 1..n-1, right-aligned; [] for tokens without a loss; the true token is not
    added). -> rows written. Written under a temporary name and renamed."""
    import json

    from stillroom.data.examples import build_examples
    from stillroom.run.folders import durable_replace
    from stillroom.teachers.cache import TeacherCache, positions, sample_id

    cache = TeacherCache(cfg.teacher.cache)
    if cache.temperature != 1.0:
        raise UserError(f"the cache in {cache.path} holds the teacher at temperature {cache.temperature}; a "
                        f"{fmt} capture holds log-probs at T=1")
    tok = cache.tokenizer()
    cache.check(cfg, tok)
    paths = [cfg.data.path or cache.index["data"]["path"], cfg.data.eval_path or cache.index["data"]["eval_path"]]
    seen, n = set(), 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for path in [p for p in paths if p]:
            examples, _ = build_examples(path, tok, cfg.data)
            for e in tqdm(examples, desc=f"cache -> {fmt} ({Path(path).name})", unit="row", disable=not progress):
                sid = sample_id(e)
                if sid in seen or not positions(e):
                    continue
                seen.add(sid)
                ids, logp, _, label = cache.rows(e)
                top = {p: [(int(t), float(v)) for t, v in zip(ids[r], logp[r].float()) if v > float("-inf")]
                       for r, p in enumerate(positions(e))}
                if fmt == "axolotl":
                    row = {"input_ids": list(e.input_ids), "labels": list(e.labels),
                           "target_token_ids": [[t for t, _ in top.get(p, [])] for p in range(len(e.input_ids) - 1)],
                           "logprobs": [[v for _, v in top.get(p, [])] for p in range(len(e.input_ids) - 1)]}
                else:
                    entries = [None] + [{} for _ in range(len(e.input_ids) - 1)]
                    for r, p in enumerate(positions(e)):
                        entry = {str(t): {"logprob": v, "rank": j + 1} for j, (t, v) in enumerate(top[p])}
                        entry.setdefault(str(e.labels[p + 1]), {"logprob": float(label[r]), "rank": None})
                        entries[p + 1] = entry
                    row = {"prompt_token_ids": list(e.input_ids), "labels": list(e.labels), "prompt_logprobs": entries}
                f.write(json.dumps(row) + "\n")
                n += 1
    durable_replace(tmp, out)
    return n


__all__ = ["import_capture", "axolotl_entries", "export_capture"]
