"""Building a data store (see store.py for what it holds and why): a source's rows read in shards
(byte ranges of a JSONL file cut at line ends, index ranges of a dataset folder, or a hub dataset
streamed), tokenized by worker processes into raw token files, then cut into examples (packed,
split) and written as the store's arrays in a temporary folder renamed into place once complete."""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from stillroom.data.examples import Report, check_report, split_examples, tokenize_rows
from stillroom.data.rows import check_source, detect_format, parse_jsonl, read_hf, text_ids
from stillroom.errors import UserError, write_failure
from stillroom.losses import IGNORE_INDEX
from stillroom.run import faults, folders

log = logging.getLogger("stillroom")

VERSION = "stillroom-store/1"   # the layout of a store's files
PARALLEL_BYTES = 8 << 20   # a JSONL file at least this big is tokenized by several processes by default
SHARD_BYTES = 64 << 20     # the most of a JSONL file one worker reads at once
FLUSH_TOKENS = 1 << 20


class _Writer:
    """Appends documents' tokens and target flags to two raw files, and their metadata to lists."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.tok_f, self.tgt_f = open(f"{prefix}.tokens", "wb"), open(f"{prefix}.targets", "wb")
        self.ids: list = []
        self.tgt: list = []
        self.held = 0
        self.lengths, self.kinds, self.routes = [], [], []

    def add(self, ids, labels, kind: int, route: int):
        a = np.asarray(ids, dtype=np.int32)
        self.ids.append(a)
        self.tgt.append(np.ones(len(a), np.uint8) if labels is None
                        else (np.asarray(labels, dtype=np.int64) != IGNORE_INDEX).astype(np.uint8))
        self.lengths.append(len(a))
        self.kinds.append(kind)
        self.routes.append(route)
        self.held += len(a)
        if self.held >= FLUSH_TOKENS:
            self.flush()

    def flush(self):
        if self.ids:
            np.concatenate(self.ids).tofile(self.tok_f)
            np.concatenate(self.tgt).tofile(self.tgt_f)
        self.ids, self.tgt, self.held = [], [], 0

    def close(self) -> dict:
        self.flush()
        self.tok_f.close()
        self.tgt_f.close()
        return {"prefix": str(self.prefix), "lengths": np.asarray(self.lengths, dtype=np.int64),
                "kinds": np.asarray(self.kinds, dtype=np.uint8), "routes": np.asarray(self.routes, dtype=np.int16)}


def _rows_of_jsonl(path: str, start: int, end: int):
    """(local line number, row | reason) of the lines in bytes [start, end) (at most SHARD_BYTES:
    the shard is read whole, its rows parsed one at a time), and the line count; or, for bytes
    that are not UTF-8, (offset, line number of the bad byte)."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    if start == 0 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start, raw[:e.start].count(b"\n") + 1
    del raw
    return parse_jsonl(text), text.count("\n")


def _tokenize_shard(job: dict) -> dict:
    """One shard of a source (a byte range of a JSONL file, or an index range of a dataset) ->
    its documents in two raw files beside `job['prefix']`, and what happened to its rows."""
    job = {**_INHERITED, **job}
    tok, dcfg, route_field, routes = job["tokenizer"], job["dcfg"], job["route_field"], job["routes"]
    if job["kind"] == "jsonl":
        got = _rows_of_jsonl(job["path"], job["start"], job["end"])
        if isinstance(got[0], int):
            return {"decode_error": got[1]}
        rows, lines = got
    elif job["kind"] == "stream":   # a hub dataset, streamed: read once, in this process, as it comes
        rows = ((i + 1, dict(row)) for i, row in enumerate(read_hf(job["path"], dcfg.split, lazy=True, streaming=True)))
        lines = 0
    else:
        ds = read_hf(job["path"], dcfg.split, lazy=True)
        rows = ((i - job["start"] + 1, dict(ds[i])) for i in range(job["start"], job["end"]))
        lines = job["end"] - job["start"]
    w = _Writer(Path(job["prefix"]))
    report, keys, seen = Report(source=job["path"]), collections.Counter(), 0

    def counted():
        nonlocal seen
        for item in rows:
            seen += 1
            yield item
            if job.get("progress") is not None:
                job["progress"](1)

    tokenize_rows(counted(), tok, dcfg, report,
                  lambda ids, labels, route: w.add(ids, labels, 1 if labels is None else 0,
                                                   -1 if route is None else routes.index(route)),
                  route_field, routes, keys)
    return {**w.close(), "bad": report.bad, "no_target": report.no_target, "truncated": report.truncated,
            "rows": seen, "lines": lines, "keys": dict(keys)}


def _shards(path: str, kind: str, parts: int, split: str) -> list[tuple[int, int]]:
    """Byte ranges of a JSONL file cut at line ends, or index ranges of a dataset."""
    if kind == "hf":
        n = len(read_hf(path, split, lazy=True))
        step = max(1, -(-n // parts))
        return [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]
    size = Path(path).stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(cuts[-1], size * k // parts))
            f.readline()
            at = f.tell()
            if at >= size:
                break
            if at > cuts[-1]:
                cuts.append(at)
    return list(zip(cuts, cuts[1:] + [size]))


def _source(path: str, tok, dcfg, route_field, routes, tmp: Path, name: str, workers: int):
    """Stage 1 for one source: its documents written under tmp, -> (shard results, Report, keys)."""
    from stillroom.run.feedback import bar

    fmt = detect_format(path, dcfg.format)
    check_source(path, fmt)
    report = Report(source=str(path))
    if fmt == "text":
        if route_field:
            raise UserError(f"teacher.route_field={route_field} needs JSONL or dataset rows carrying that field; "
                            f"{path} is plain text")
        w = _Writer(tmp / f"{name}-0")
        w.add(text_ids(path, tok), None, 1, -1)
        report.rows = 1
        return [w.close()], report, {}
    size = Path(path).stat().st_size if fmt == "jsonl" else 0
    remote = fmt == "hf" and not Path(path).exists()   # a hub id: streamed, never downloaded whole
    parallel = not remote and workers > 1 and (size >= PARALLEL_BYTES or dcfg.workers is not None)
    # shards of at most SHARD_BYTES (each is read whole), at least 4 per process when parallel
    parts = max(workers * 4 if parallel else 1, -(-size // SHARD_BYTES))
    shards = [(0, 0)] if remote else _shards(path, fmt, parts, dcfg.split)
    jobs = [{"tokenizer": tok, "dcfg": dcfg, "route_field": route_field, "routes": routes,
             "kind": "stream" if remote else fmt, "path": path, "start": a, "end": b,
             "prefix": str(tmp / f"{name}-{k}")} for k, (a, b) in enumerate(shards)]
    desc = f"tokenizing {Path(path).name}"
    if parallel and len(jobs) > 1:
        results = _run_parallel(jobs, workers, desc)
    else:
        with bar(desc=desc, unit="row") as b:
            results = []
            for job in jobs:
                job["progress"] = b.update
                results.append(_tokenize_shard(job))
    line0 = 0
    keys: collections.Counter = collections.Counter()
    for r in results:
        if "decode_error" in r:
            raise UserError(f"data file {path} is not UTF-8 text (line {line0 + r['decode_error']}); "
                            "re-encode it as UTF-8")
        report.rows += r["rows"]
        report.bad += [(line0 + n, why) for n, why in r["bad"]]
        report.no_target += [line0 + n for n in r["no_target"]]
        report.truncated += r["truncated"]
        keys.update(r["keys"])
        line0 += r["lines"]
    return results, report, keys


_INHERITED: dict = {}   # what every job shares (the tokenizer...), inherited by the forked workers


def _run_parallel(jobs, workers, desc):
    """The jobs on `workers` forked processes. What they share is inherited, not pickled per job
    (unpickling a tokenizer costs more than a small shard's work)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from stillroom.run import folders
    from stillroom.run.feedback import bar

    shared = ("tokenizer", "dcfg", "route_field", "routes")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # a forked tokenizer must not fork threads
    ctx = mp.get_context("fork")
    _INHERITED.update({k: jobs[0][k] for k in shared})
    from stillroom.data.render import _labeller, _shapes, chat_renderer
    tok = jobs[0]["tokenizer"]   # its checked fast paths made once here, inherited by every worker
    _labeller(tok)
    if tok.chat_template:
        _shapes(tok, chat_renderer(tok))
    try:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=folders.forked_worker) as pool, \
                bar(total=len(jobs), desc=f"{desc} ({min(workers, len(jobs))} processes)", unit="shard") as b:
            futures = [pool.submit(_tokenize_shard, {k: v for k, v in j.items() if k not in shared}) for j in jobs]
            results = []
            for f in futures:
                results.append(f.result())
                b.update(1)
    finally:
        _INHERITED.clear()
    return results


def _names(counts: dict):
    """keys() for check_report: the rows' keys, most common first."""
    return lambda: sorted(counts, key=lambda k: -counts[k])


def _examples(lengths, kinds, seq_len: int, doc0: int) -> list[list[tuple[int, int, int]]]:
    """Documents -> examples as segment lists: each kind-0 document one example, in order, then the
    kind-1 (text) documents packed into blocks as data.pack_documents cuts them."""
    out = [[(doc0 + int(d), 0, int(lengths[d]))] for d in np.flatnonzero(kinds == 0)]
    blocks, cur, room = [], [], seq_len
    for d in np.flatnonzero(kinds == 1):
        n, at = int(lengths[d]), 0
        while at < n:
            take = min(room, n - at)
            cur.append((doc0 + int(d), at, take))
            at += take
            room -= take
            if room == 0:
                blocks.append(cur)
                cur, room = [], seq_len
    if cur:
        blocks.append(cur)
    return out + [b for b in blocks if sum(s[2] for s in b) >= 2]


def _pack(examples: list[list[tuple]], seq_len: int) -> list[list[tuple]]:
    """data.pack_examples on segment lists (first-fit decreasing over lengths, bins in order)."""
    from stillroom.data.examples import ffd_bins

    bins = ffd_bins([sum(s[2] for s in e) for e in examples], seq_len)
    return [[s for i in b for s in examples[i]] for b in bins]


def build(folder: Path, dcfg, tokenizer, seed: int, route_field, routes, inputs: dict, workers: int) -> Path:
    """Build the store for `inputs` into `folder` (atomically: see the module's docstring)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return _build(tmp, folder, dcfg, tokenizer, seed, route_field, routes, inputs, workers)
    except OSError as e:   # a full disk, a folder that is not writable: nothing half-written stays
        why = write_failure(e, folder.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write the data store {folder}: {why}; free space or set data.store "
                        "to another folder (data.store=off: tokenize in memory)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(tmp, folder, dcfg, tokenizer, seed, route_field, routes, inputs, workers) -> Path:
    """build()'s work, in the temporary folder `tmp`, renamed to `folder` once complete."""
    results, report, keys = _source(dcfg.path, tokenizer, dcfg, route_field, routes, tmp, "data", workers)
    n_data = sum(len(r["lengths"]) for r in results)
    lengths = np.concatenate([r["lengths"] for r in results])
    kinds = np.concatenate([r["kinds"] for r in results])
    examples = _examples(lengths, kinds, dcfg.seq_len, 0)
    if dcfg.max_examples:
        examples = examples[:dcfg.max_examples]
    check_report(report, dcfg, len(examples), _names(keys) if detect_format(dcfg.path, dcfg.format) != "text" else None)
    reports = [report]
    if dcfg.eval_path:
        more, e_report, e_keys = _source(dcfg.eval_path, tokenizer, dcfg, route_field, routes, tmp, "eval",
                                         workers)
        e_len = np.concatenate([r["lengths"] for r in more])
        e_kinds = np.concatenate([r["kinds"] for r in more])
        held = _examples(e_len, e_kinds, dcfg.seq_len, n_data)
        if dcfg.max_examples:
            held = held[:dcfg.max_examples]
        check_report(e_report, dcfg, len(held),
                     _names(e_keys) if detect_format(dcfg.eval_path, dcfg.format) != "text" else None)
        reports.append(e_report)
        results += more
        lengths, kinds = np.concatenate([lengths, e_len]), np.concatenate([kinds, e_kinds])
        train = examples
    else:
        # split_examples on indices: the same held-out set as data.split_examples
        train_i, held_i = split_examples(list(range(len(examples))), dcfg.eval_fraction, seed)
        if not train_i:
            raise UserError(f"no training examples left in {dcfg.path} after the held-out split")
        train, held = [examples[i] for i in train_i], [examples[i] for i in held_i]
    if dcfg.pack:
        n = len(train)
        train = _pack(train, dcfg.seq_len)
        log.info("data.pack: %d training examples packed into %d rows of up to %d tokens",
                 n, len(train), dcfg.seq_len)
    sizes = _write_arrays(tmp, results, lengths, train + held)
    index = {"format": VERSION, "inputs": inputs, "train_examples": len(train), "held_examples": len(held),
             "tokens": int(lengths.sum()), "documents": int(len(lengths)), "sizes": sizes,
             "reports": [_report_json(r) for r in reports],
             "files": folders.checksums(tmp)}   # verified when the store is opened (store.Store)
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    faults.point("store.written")   # complete under its temporary name, not yet in place
    folders.durable_replace(tmp, folder)
    return folder


def _write_arrays(tmp: Path, results: list[dict], lengths, examples: list[list[tuple]]) -> dict:
    """The store's arrays, from the shards' raw files and the examples' segments. -> their sizes."""
    total = int(lengths.sum())
    for name, dtype in (("tokens", np.int32), ("targets", np.uint8)):
        out = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=(total,))
        at = 0
        for r in results:
            part = np.fromfile(f"{r['prefix']}.{name}", dtype=dtype)
            out[at:at + len(part)] = part
            at += len(part)
            os.unlink(f"{r['prefix']}.{name}")
        out.flush()
        del out
    np.save(tmp / "docs.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(tmp / "routes.npy", np.concatenate([r["routes"] for r in results]).astype(np.int16))
    np.save(tmp / "layout.npy", np.concatenate([[0], np.cumsum([len(e) for e in examples])]).astype(np.int64))
    segs = np.asarray([s for e in examples for s in e], dtype=np.int64).reshape(-1, 3)
    np.save(tmp / "segs.npy", segs)
    return {"tokens": total, "targets": total, "docs": len(lengths) + 1, "routes": len(lengths),
            "layout": len(examples) + 1, "segs": len(segs)}


def _report_json(r: Report) -> dict:
    return {"source": r.source, "rows": r.rows, "bad": r.bad[:100], "bad_total": len(r.bad),
            "truncated": r.truncated, "no_target": r.no_target[:10], "no_target_total": len(r.no_target)}


