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

DistillKit / open-instruct (`cache.source=distillkit`): a folder of data_{i}.parquet files and
their compression_config.yaml (teachers/distillkit.py: the format, decoded here). Its sequences
are written beside the cache as data.jsonl (input_ids, and labels: every token whose row lists
something), which the cache names as its data.
As for axolotl, the realized token outside the top-k gets the tail's log-mass.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

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
    (cache.source: vllm, axolotl or distillkit), on teacher.model's tokenizer (which must be the
    one the capture was made with). A row it cannot read stops it in one line, and the cache it
    began is removed."""
    from stillroom.data.rows import read_jsonl
    from stillroom.teachers.cache import start_import, write_json

    path, out, fmt = Path(cfg.data.path), Path(cfg.cache.path), cfg.cache.source
    field, what = {"vllm": ("prompt_logprobs", "prompt_token_ids (or input_ids) and prompt_logprobs (a vLLM capture)"),
                   "axolotl": ("logprobs", "input_ids and logprobs (an axolotl KD row)"),
                   "distillkit": ("compressed_logprobs", "")}[fmt]
    if cfg.data.pack:
        raise UserError(f"cache.source={fmt}: a capture's rows are its examples; set data.pack=false (here and in "
                        "the runs that read the cache)")
    if fmt == "distillkit":   # a folder of parquet files, read a batch at a time
        from stillroom.teachers import distillkit
        distillkit.check(path)   # (refused here, before the cache folder is touched)
        rows = distillkit.rows(path)
    else:
        rows, bad = read_jsonl(path)
        if bad:
            raise UserError(f"{path} line {bad[0][0]}: {bad[0][1]}")
    source = f"DistillKit capture in {path}" if fmt == "distillkit" else f"{fmt} {field} in {path}"
    index = start_import(cfg, tok, model_config, overwrite, source, cfg.cache.dtype)
    if fmt == "distillkit":   # the sequences as the data the cache names (a folder of parquet is no data file)
        index["data"] = {"path": str((out / "data.jsonl").absolute()), "eval_path": None}
    try:
        used = _fill(cfg, tok, rows, index, lambda n: f"{path} row {n}: ", what, progress)
    except BaseException:   # a row it cannot read: the cache this call began is removed, not left half-written
        _discard(out)
        raise
    if not used:
        _discard(out)
        raise UserError(f"no row of {path} has a position to learn from (seq_len {cfg.data.seq_len})")
    index["complete"] = True
    write_json(out / "index.json", index)
    log.info("%d rows of %s in the cache %s", used, path, out)
    return index


def _discard(out: Path):
    """Everything this import wrote in `out` (its lock stays with the command, which removes a folder
    it made for nothing)."""
    from stillroom.run.folders import entries

    for p in entries(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _fill(cfg, tok, rows, index, where, what: str, progress: bool) -> int:
    """The capture's rows into the cache's shards (and, for DistillKit, its data.jsonl) -> rows used.
    where(n): the prefix of row n's error; what: the fields a JSONL row needs."""
    from stillroom.data.examples import Example, row_doc
    from stillroom.teachers import distillkit
    from stillroom.teachers.cache import ShardWriter, sample_id
    from stillroom.teachers.served import prompt_logprobs_entries, target_rows

    out, k, fmt = Path(cfg.cache.path), cfg.cache.top_k, cfg.cache.source
    field = {"vllm": "prompt_logprobs", "axolotl": "logprobs", "distillkit": "top"}[fmt]
    writer, done, used = ShardWriter(out, index, cfg.cache.shard_rows), set(), 0
    data = open(out / "data.jsonl", "w") if fmt == "distillkit" else None
    try:
        for n, row in tqdm(rows, desc=f"{fmt} capture -> cache", unit="row", disable=not progress):
            def fail(why, n=n):
                return UserError(where(n) + why)
            if not isinstance(row, dict) or field not in row:
                raise fail(f"needs {what}")
            if data is not None:
                data.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
            got = row_doc(row, tok, cfg.data)
            if got[0] == "bad":
                raise fail(got[1])
            if got[0] != "example":
                continue
            e = Example(got[1], got[2])
            sid = sample_id(e)
            if sid in done:
                continue
            done.add(sid)
            n_tok = len(e.input_ids)
            raw = (prompt_logprobs_entries(row["prompt_logprobs"], n_tok, fail) if fmt == "vllm"
                   else distillkit.entries(row, n_tok) if fmt == "distillkit"
                   else axolotl_entries(row, n_tok, fail))
            ids, logp, tail, label_logp = target_rows(e, raw, k, fail)
            if int(ids.max()) >= len(tok):
                raise fail(f"token id {int(ids.max())} is outside {cfg.teacher.model}'s vocabulary ({len(tok)}): "
                           "the capture was made with another tokenizer")
            writer.add(sid, ids, logp, tail, label_logp)
            writer.flush_if_full()
            used += 1
        writer.flush()
    finally:
        if data is not None:
            data.close()
    return used


def export_capture(cfg, out: Path, fmt: str, progress=True, layout: dict | None = None) -> int:
    """The cache at teacher.cache as another tool's capture, one row per example of its data (the
    config's, or what the cache was built from). fmt vllm: JSONL of `prompt_token_ids`, `labels`
    and `prompt_logprobs` (entry i + 1 holds position i's stored top-k with ranks 1..k, and the
    true token's log-prob when it is not among them, its rank unknown: null; tokens without a
    loss: an empty entry). fmt axolotl: JSONL of `input_ids`, `labels`, `target_token_ids` and
    `logprobs` (axolotl's KD layout: a row per token 1..n-1, right-aligned; [] for tokens without
    a loss; the true token is not added). fmt distillkit: a folder of data_{i}.parquet and
    compression_config.yaml (teachers/distillkit.py) in its lossless layout (every log-prob exact,
    in the cache's dtype; tokens without a loss: -inf rows), or in `layout` (a DistillKit
    compression config: its compressed layouts). -> rows written. Written under temporary names
    and renamed."""
    from stillroom.run.folders import durable_replace
    from stillroom.teachers.cache import TeacherCache

    cache = TeacherCache(cfg.teacher.cache)
    if cache.temperature != 1.0:
        raise UserError(f"the cache in {cache.path} holds the teacher at temperature {cache.temperature}; a "
                        f"{fmt} capture holds log-probs at T=1")
    tok = cache.tokenizer()
    cache.check(cfg, tok)
    if fmt == "distillkit":
        from stillroom.teachers import distillkit
        stored = ((e, top) for e, top, _ in _stored(cfg, cache, tok, fmt, progress))
        dtype = cache.index["dtype"] if cache.index["dtype"] != "packed" else "float32"   # (as it reads back)
        return distillkit.write(out, stored, cache.top_k, len(tok), dtype, progress=False, layout=layout)
    n, tmp = 0, out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for e, top, label in _stored(cfg, cache, tok, fmt, progress):
            if fmt == "axolotl":
                row = {"input_ids": list(e.input_ids), "labels": list(e.labels),
                       "target_token_ids": [[t for t, _ in top.get(p, [])] for p in range(len(e.input_ids) - 1)],
                       "logprobs": [[v for _, v in top.get(p, [])] for p in range(len(e.input_ids) - 1)]}
            else:
                entries = [None] + [{} for _ in range(len(e.input_ids) - 1)]
                for r, p in enumerate(top):   # (the positions with a loss, in order)
                    entry = {str(t): {"logprob": v, "rank": j + 1} for j, (t, v) in enumerate(top[p])}
                    entry.setdefault(str(e.labels[p + 1]), {"logprob": label[r], "rank": None})
                    entries[p + 1] = entry
                row = {"prompt_token_ids": list(e.input_ids), "labels": list(e.labels), "prompt_logprobs": entries}
            f.write(json.dumps(row) + "\n")
            n += 1
    durable_replace(tmp, out)
    return n


def _stored(cfg, cache, tok, fmt, progress):
    """-> (example, {position: [(id, log-prob), ...] highest first}, the true tokens' log-probs in
    position order) for each distinct example of the cache's data that has a position to learn."""
    from stillroom.data.examples import build_examples
    from stillroom.teachers.cache import positions, sample_id

    paths = [cfg.data.path or cache.index["data"]["path"], cfg.data.eval_path or cache.index["data"]["eval_path"]]
    seen = set()
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
            yield e, top, [float(x) for x in label]


__all__ = ["import_capture", "axolotl_entries", "export_capture"]
