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
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stillroom.errors import UserError

log = logging.getLogger("stillroom")


def import_vllm(cfg, tok, model_config=None, overwrite=False, progress=True) -> dict:
    """A stillroom cache (teachers/cache.py's format) from a vLLM prompt_logprobs capture at
    cfg.data.path, on teacher.model's tokenizer (which must be the one the capture was made with)."""
    from stillroom.data.examples import Example, row_doc
    from stillroom.data.rows import read_jsonl
    from stillroom.teachers.cache import ShardWriter, sample_id, start_import, write_json
    from stillroom.teachers.served import prompt_logprobs_entries, target_rows

    path, out, k = Path(cfg.data.path), Path(cfg.cache.path), cfg.cache.top_k
    if cfg.data.pack:
        raise UserError("cache.source=vllm: a capture's rows are its examples; set data.pack=false (here and in "
                        "the runs that read the cache)")
    rows, bad = read_jsonl(path)
    if bad:
        raise UserError(f"{path} line {bad[0][0]}: {bad[0][1]}")
    index = start_import(cfg, tok, model_config, overwrite, f"vllm prompt_logprobs in {path}", cfg.cache.dtype)
    writer, done, used = ShardWriter(out, index, cfg.cache.shard_rows), set(), 0
    dtype = {"float16": torch.float16, "float32": torch.float32}[cfg.cache.dtype]
    for n, row in tqdm(rows, desc="vllm capture -> cache", unit="row", disable=not progress):
        if not isinstance(row, dict) or "prompt_logprobs" not in row:
            raise UserError(f"{path} row {n}: needs prompt_token_ids (or input_ids) and prompt_logprobs "
                            "(a vLLM capture)")
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
        raw = prompt_logprobs_entries(row["prompt_logprobs"], len(e.input_ids), fail)
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


def export_vllm(cfg, out: Path, progress=True) -> int:
    """The cache at teacher.cache as a vLLM capture: one JSONL row per example of its data (the
    config's, or what the cache was built from), `prompt_token_ids`, `labels` and `prompt_logprobs`
    (entry i + 1 holds position i's stored top-k with ranks 1..k, and the true token's log-prob
    when it is not among them, its rank unknown: null; tokens without a loss: an empty entry).
    -> rows written. Written under a temporary name and renamed."""
    import json

    from stillroom.data.examples import build_examples
    from stillroom.run.folders import durable_replace
    from stillroom.teachers.cache import TeacherCache, positions, sample_id

    cache = TeacherCache(cfg.teacher.cache)
    if cache.temperature != 1.0:
        raise UserError(f"the cache in {cache.path} holds the teacher at temperature {cache.temperature}; a vLLM "
                        "capture holds log-probs at T=1")
    tok = cache.tokenizer()
    cache.check(cfg, tok)
    paths = [cfg.data.path or cache.index["data"]["path"], cfg.data.eval_path or cache.index["data"]["eval_path"]]
    seen, n = set(), 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for path in [p for p in paths if p]:
            examples, _ = build_examples(path, tok, cfg.data)
            for e in tqdm(examples, desc=f"cache -> vllm ({Path(path).name})", unit="row", disable=not progress):
                sid = sample_id(e)
                if sid in seen or not positions(e):
                    continue
                seen.add(sid)
                ids, logp, tail, label = cache.rows(e)
                entries = [None] + [{} for _ in range(len(e.input_ids) - 1)]
                for r, p in enumerate(positions(e)):
                    entry = {str(int(t)): {"logprob": float(v), "rank": j + 1}
                             for j, (t, v) in enumerate(zip(ids[r], logp[r].float())) if v > float("-inf")}
                    true = str(e.labels[p + 1])
                    entry.setdefault(true, {"logprob": float(label[r]), "rank": None})
                    entries[p + 1] = entry
                f.write(json.dumps({"prompt_token_ids": list(e.input_ids), "labels": list(e.labels),
                                    "prompt_logprobs": entries}) + "\n")
                n += 1
    durable_replace(tmp, out)
    return n


__all__ = ["import_vllm", "export_vllm"]
