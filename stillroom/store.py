"""Tokenize once: the data store.

A run's examples are built from its data once, kept on disk and memory-mapped, under a key of
everything they depend on: the data files' fingerprint (path, size, modification time), the
tokenizer (its whole definition and chat template), and every data setting that shapes the
examples (format, split, fields, seq_len, packing, the held-out split and its seed, max_examples,
skip_bad_rows, teacher routing). A second run with the same key reads no text; any change of key
builds a new store. Training reads examples by index: what lives in RAM is the memory map and,
per epoch, the shuffled order (8 bytes an example).

A store is a folder `<stillroom cache>/data/store-<key>/` (or under `data.store=FOLDER`):

  tokens.npy   every document's tokens end to end (int32)
  targets.npy  per token: 1 where it is its own label, 0 where it carries no loss (prompts)
  docs.npy     where each document starts in tokens (int64, n_docs + 1)
  routes.npy   per document: the index of the teacher it is routed to, -1 for none (int16)
  layout.npy   per example: where its segments start in segs (int64, n_examples + 1)
  segs.npy     per segment: (document, start, length) (int64, n_segments x 3)
  index.json   the key's inputs, counts, the sources' reports, written last

Examples 0..n_train-1 are the training set (packed when data.pack), the rest the held-out set. A
segment is a run of one document's tokens; an example of several segments is a packed row, each
segment attending only to itself, its first token not a target (as data.pack_documents and
data.pack_examples make them: the examples are the same, pinned by tests).

Why flat memory-mapped arrays rather than `datasets` Arrow tables and `map`: this is the layout
large-scale trainers use (Megatron-LM's indexed dataset, nanoGPT's .bin files): an example is two
slices of an array, with no per-row decoding, and packing is arithmetic on lengths. The build is
stillroom's own reader (its bad-row reports by line number, the row formats, routing, cut answers)
run over byte ranges of a JSONL file (or index ranges of a `datasets` folder) in worker processes;
`datasets`' JSON loader would drop the line numbers of bad rows and its map cache is keyed on a
hash of the function, not of the tokenizer. Hugging Face dataset folders are read with `datasets`
(memory-mapped, never whole in RAM; split into index ranges); a hub id is streamed
(`load_dataset(..., streaming=True)`: read as it downloads, in one process, nothing kept but the
store).

A build writes into `store-<key>.tmp-<pid>` and renames it into place once complete and flushed:
a killed build is never used (the next build removes its leftovers). Two runs that need the same
store: the second waits for the first (a lock on the store's name) and then reads it.
"""
from __future__ import annotations

import collections.abc
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from . import faults, folders
from .data import (IGNORE_INDEX, Example, Report, check_report, check_source, detect_format, parse_jsonl,
                   read_hf, report_notes, row_doc, split_examples)
from .errors import UserError, write_failure

log = logging.getLogger("stillroom")

VERSION = "stillroom-store/1"
PARALLEL_BYTES = 8 << 20   # a JSONL file at least this big is tokenized by several processes by default
SHARD_BYTES = 64 << 20     # the most of a JSONL file one worker reads at once
TEXT_PIECE = 16 << 20      # a plain text file bigger than 4 pieces is tokenized piece by piece (see _text_doc)
FLUSH_TOKENS = 1 << 20


# ---------------------------------------------------------------------------------- the key

def tokenizer_key(tok) -> str:
    """A hash of everything a tokenizer does to text: its whole definition (vocabulary, merges,
    normalizer, pre-tokenizer, post-processor), chat template, special tokens and class."""
    h = hashlib.sha1()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([type(tok).__name__, tok.chat_template, tok.eos_token_id, tok.bos_token_id,
                         sorted(tok.all_special_ids)], default=str).encode())
    return h.hexdigest()[:16]


def source_key(path: str | None, fmt: str) -> list | None:
    """What identifies a data source without reading it: a file's resolved path, size and
    modification time (a folder's: every file under it); a hub id as given."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return [path, fmt]
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns, fmt]
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return [str(p.resolve()), fmt, [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


def store_key(dcfg, tokenizer, seed: int, route_field=None, routes=None) -> tuple[str, dict]:
    inputs = {"version": VERSION, "data": source_key(dcfg.path, detect_format(dcfg.path, dcfg.format)),
              "eval_data": source_key(dcfg.eval_path, detect_format(dcfg.eval_path, dcfg.format))
              if dcfg.eval_path else None,
              "tokenizer": tokenizer_key(tokenizer),
              "settings": {k: getattr(dcfg, k) for k in ("format", "split", "fields", "seq_len", "pack",
                                                          "eval_fraction", "max_examples", "skip_bad_rows")},
              "seed": seed if not dcfg.eval_path else None, "route_field": route_field, "routes": routes}
    return hashlib.sha1(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16], inputs


def root(dcfg) -> Path:
    from . import models
    return Path(dcfg.store) if dcfg.store not in ("auto", "off") else models.cache_dir() / "data"


# ---------------------------------------------------------------------------------- reading

def _load(path: Path, mmap: bool = True):
    return np.load(path, mmap_mode="r" if mmap else None)   # (an empty array cannot be mapped)


class Store:
    """An opened store: its arrays memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        names = ("tokens", "targets", "docs", "routes", "layout", "segs")
        self.tokens, self.targets, self.docs, self.routes, self.layout, self.segs = (
            _load(self.folder / f"{n}.npy", self.index["sizes"][n] > 0) for n in names)
        self.route_names = self.index["inputs"]["routes"]

    def __len__(self):
        return len(self.layout) - 1

    def example(self, i: int) -> Example:
        a, b = int(self.layout[i]), int(self.layout[i + 1])
        segs = self.segs[a:b]
        ids, labels, lengths = [], [], []
        for doc, start, n in segs.tolist():
            at = int(self.docs[doc]) + start
            part = self.tokens[at:at + n]
            lab = np.where(self.targets[at:at + n] != 0, part, IGNORE_INDEX)
            if b - a > 1:
                lab[0] = IGNORE_INDEX   # a packed document's first token is not predicted
            ids.append(part)
            labels.append(lab)
            lengths.append(n)
        route = int(self.routes[segs[0][0]]) if len(segs) else -1
        return Example(np.concatenate(ids).tolist(), np.concatenate(labels).tolist(),
                       tuple(lengths) if len(lengths) > 1 else None,
                       self.route_names[route] if route >= 0 else None)

    def split(self) -> tuple["Examples", "Examples"]:
        n_train = self.index["train_examples"]
        return Examples(self, np.arange(n_train)), Examples(self, np.arange(n_train, len(self)))


class Examples(collections.abc.Sequence):
    """Examples of a store, read by index on demand (a list's interface: len, [i], slices, +)."""

    def __init__(self, store: Store, idx: np.ndarray):
        self.store, self.idx = store, np.asarray(idx, dtype=np.int64)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Examples(self.store, self.idx[i])
        return self.store.example(int(self.idx[i]))

    def __iter__(self):
        for i in self.idx:
            yield self.store.example(int(i))

    def __add__(self, other):
        if isinstance(other, Examples) and other.store is self.store:
            return Examples(self.store, np.concatenate([self.idx, other.idx]))
        return list(self) + list(other)

    def __repr__(self):
        return f"<{len(self)} examples of {self.store.folder}>"


# ---------------------------------------------------------------------------------- building

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
    bad, no_target, truncated, seen, keys = [], [], 0, 0, collections.Counter()
    for n, row in rows:
        seen += 1
        if isinstance(row, str):
            bad.append((n, row))
            continue
        if len(keys) < 1000:
            keys.update(row.keys())
        got = row_doc(row, tok, dcfg, route_field, routes)
        if got[0] == "bad":
            bad.append((n, got[1]))
        elif got[0] == "text":
            w.add(got[1], None, 1, -1)
        elif got[0] == "no_target":
            truncated += got[1]
            no_target.append(n)
        else:
            _, ids, labels, route, cut = got
            truncated += cut
            w.add(ids, labels, 0, routes.index(route) if route is not None else -1)
        if job.get("progress") is not None:
            job["progress"](1)
    return {**w.close(), "bad": bad, "no_target": no_target, "truncated": truncated, "rows": seen,
            "lines": lines, "keys": dict(keys)}


def _text_doc(path: str, tok, w: _Writer):
    """A plain text file -> one document. Up to 4 pieces' size it is tokenized whole (exactly as
    data.build_examples does); beyond, piece by piece at line ends (tokens can differ from
    tokenizing it whole only where two pieces meet: a token or two in 16 MB), so it never has to
    fit in memory as one string."""
    size = Path(path).stat().st_size
    if size > 1 << 20:
        log.info("tokenizing %s (%.1f MB of text)", path, size / 2**20)
    ids: list[int] = []
    with open(path, encoding="utf-8-sig") as f:
        try:
            if size <= 4 * TEXT_PIECE:
                text = f.read()
                if not text.strip():
                    raise UserError(f"data file {path} has no text")
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                while True:
                    piece = f.read(TEXT_PIECE)
                    if not piece:
                        break
                    piece += f.readline()
                    ids += tok(piece, add_special_tokens=False)["input_ids"]
        except UnicodeDecodeError:
            raise UserError(f"data file {path} is not UTF-8 text") from None
    if not ids:
        raise UserError(f"data file {path} has no text")
    w.add(ids, None, 1, -1)


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
    from .feedback import bar

    fmt = detect_format(path, dcfg.format)
    check_source(path, fmt)
    report = Report(source=str(path))
    if fmt == "text":
        if route_field:
            raise UserError(f"teacher.route_field={route_field} needs JSONL or dataset rows carrying that field; "
                            f"{path} is plain text")
        w = _Writer(tmp / f"{name}-0")
        _text_doc(path, tok, w)
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

    from .feedback import bar

    shared = ("tokenizer", "dcfg", "route_field", "routes")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # a forked tokenizer must not fork threads
    ctx = mp.get_context("fork")
    _INHERITED.update({k: jobs[0][k] for k in shared})
    from .data import _encoder, _one_render, chat_renderer
    tok = jobs[0]["tokenizer"]   # its checked fast paths made once here, inherited by every worker
    _encoder(tok)
    if tok.chat_template:
        _one_render(tok, chat_renderer(tok))
    try:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool, \
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
    from .data import ffd_bins

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
             "reports": [_report_json(r) for r in reports]}
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


def _report_back(d: dict) -> Report:
    return Report(source=d["source"], rows=d["rows"], bad=[tuple(x) for x in d["bad"]], truncated=d["truncated"],
                  no_target=list(d["no_target"]), bad_total=d["bad_total"], no_target_total=d["no_target_total"])


def workers_for(dcfg) -> int:
    return dcfg.workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def open_or_build(dcfg, tokenizer, seed: int, route_field=None, routes=None, build_ok: bool = True) -> Store:
    """The store for this data and tokenizer: opened when it exists, else built (under a lock,
    so a second run waits for the first and then reads its store). build_ok=False (a launch's
    other processes): wait until the main process has built it, then open it."""
    key, inputs = store_key(dcfg, tokenizer, seed, route_field, routes)
    base = root(dcfg)
    folder = base / f"store-{key}"
    if not build_ok:   # another process of a launch: the main one builds it (polled, so a build longer
        import time     # than the process group's timeout does not stop the launch)
        said = False
        while not (folder / "index.json").is_file():
            if not said:
                log.info("waiting for the main process to build the data store %s", folder)
                said = True
            time.sleep(1.0)
    if (folder / "index.json").is_file():
        return _reopened(folder, dcfg)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data store folder {base}: cannot create it ({e.strerror}); set data.store to "
                        "a writable folder (or data.store=off)") from None
    with folders.claim(base, key="the data store", name=folder.name, wait=True):
        if (folder / "index.json").is_file():   # built by the run we waited for
            return _reopened(folder, dcfg)
        for old in base.glob(f"{folder.name}.tmp-*"):   # a killed build's leftovers (we hold its lock)
            shutil.rmtree(old, ignore_errors=True)
        from .feedback import phase
        with phase(f"data: tokenizing once into {folder}"):
            build(folder, dcfg, tokenizer, seed, route_field, routes, inputs, workers_for(dcfg))
    return Store(folder)


def _reopened(folder: Path, dcfg) -> Store:
    s = Store(folder)
    for d in s.index["reports"]:   # what the build said about the rows, said again
        report_notes(_report_back(d), dcfg)
    log.info("data: %d train / %d held-out examples (%s tokens) from the store %s", s.index["train_examples"],
             s.index["held_examples"], f"{s.index['tokens']:,}", folder)
    return s
