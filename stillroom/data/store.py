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

index.json also holds each file's size and CRC-32 (written at build time): opening a store checks
them, so a truncated, zeroed or torn array is refused in one line saying how to rebuild it, not
read as data (a full read of the arrays at each open: about a second for 2 GB here).

A build writes into `store-<key>.tmp-<pid>` and renames it into place once complete and flushed:
a killed build is never used (the next build removes its leftovers). Two runs that need the same
store: the second waits for the first (a lock on the store's name) and then reads it. The
build itself is store_build.py.
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

from stillroom.data.examples import (Example, Report, build_examples, in_memory, pack_examples, report_notes,
                                     split_examples)
from stillroom.data.rows import detect_format
from stillroom.data.store_build import VERSION, build
from stillroom.errors import UserError
from stillroom.losses import IGNORE_INDEX
from stillroom.run import folders

log = logging.getLogger("stillroom")



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
    from stillroom.models import core as models
    return Path(dcfg.store) if dcfg.store not in ("auto", "off") else models.cache_dir() / "data"


# ---------------------------------------------------------------------------------- reading

def _load(path: Path, mmap: bool = True):
    return np.load(path, mmap_mode="r" if mmap else None)   # (an empty array cannot be mapped)


class Store:
    """An opened store: its arrays memory-mapped."""

    def __init__(self, folder: Path, verify: bool = True):
        self.folder = Path(folder)
        names = ("tokens", "targets", "docs", "routes", "layout", "segs")
        try:
            self.index = json.loads((self.folder / "index.json").read_text())
            why = folders.damage(self.folder, self.index.get("files") or {}) if verify else None
            if why is None:
                self.tokens, self.targets, self.docs, self.routes, self.layout, self.segs = (
                    _load(self.folder / f"{n}.npy", self.index["sizes"][n] > 0) for n in names)
                self.route_names = self.index["inputs"]["routes"]
                if any(len(a) != self.index["sizes"][n] for n, a in zip(names, self.arrays())):
                    why = "an array's length differs from its index"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
        if why is not None:
            raise UserError(f"the data store {self.folder} is damaged ({why}); remove it and it is built again "
                            f"from the data at the next run: rm -r {self.folder}")

    def arrays(self):
        return self.tokens, self.targets, self.docs, self.routes, self.layout, self.segs

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
                        "a writable folder (or data.store=off)" +
                        ("" if dcfg.store != "auto" else ", or STILLROOM_CACHE to a writable cache")) from None
    # every process takes the lock (in a launch the main one builds while the others poll, but a
    # library caller may have every process build: only one may, and none may remove its work)
    with folders.claim(base, key="the data store", name=folder.name, wait=True, every_process=True):
        if (folder / "index.json").is_file():   # built by the run we waited for
            return _reopened(folder, dcfg)
        for old in base.glob(f"{folder.name}.tmp-*"):   # a killed build's leftovers (we hold its lock)
            shutil.rmtree(old, ignore_errors=True)
        from stillroom.run.feedback import phase
        with phase(f"data: tokenizing once into {folder}"):
            build(folder, dcfg, tokenizer, seed, route_field, routes, inputs, workers_for(dcfg))
    return Store(folder, verify=False)   # just written and checked by its build


def _reopened(folder: Path, dcfg) -> Store:
    s = Store(folder)
    for d in s.index["reports"]:   # what the build said about the rows, said again
        report_notes(_report_back(d), dcfg)
    log.info("data: %d train / %d held-out examples (%s tokens) from the store %s", s.index["train_examples"],
             s.index["held_examples"], f"{s.index['tokens']:,}", folder)
    return s


def uses_store(cfg, rows=None, eval_rows=None) -> bool:
    return rows is None and eval_rows is None and cfg.data.path is not None and cfg.data.store != "off"


def load_data(cfg, tokenizer, rows=None, eval_rows=None, build: bool = True):
    """-> (train examples, eval examples) for a config; `rows` / `eval_rows`: data in memory (see
    data.in_memory) instead of data.path / data.eval_path. A data file is read through the data
    store (tokenized once, read by index; build=False opens it only) unless data.store=off; rows in
    memory, or data.store=off, are tokenized in memory (data.build_examples)."""
    t = getattr(cfg, "teacher", None)
    field_ = getattr(t, "route_field", None)
    routes = [t.name] + [m.name for m in t.mix] if field_ else None
    if uses_store(cfg, rows, eval_rows):
        return open_or_build(cfg.data, tokenizer, cfg.train.seed, field_, routes, build_ok=build).split()
    source = in_memory(rows, "train_data") if rows is not None else cfg.data.path
    examples, _ = build_examples(source, tokenizer, cfg.data, field_, routes)
    if cfg.data.eval_path or eval_rows is not None:
        held_source = in_memory(eval_rows, "eval_data") if eval_rows is not None else cfg.data.eval_path
        held, _ = build_examples(held_source, tokenizer, cfg.data, field_, routes)
        return (pack_examples(examples, cfg.data.seq_len) if cfg.data.pack else examples), held
    train, held = split_examples(examples, cfg.data.eval_fraction, cfg.train.seed)
    if not train:
        raise UserError(f"no training examples left in {cfg.data.path or 'train_data'} after the held-out split")
    if cfg.data.pack:   # the held-out set stays one example per row (its prompts time generation)
        n = len(train)
        train = pack_examples(train, cfg.data.seq_len)
        log.info("data.pack: %d training examples packed into %d rows of up to %d tokens",
                 n, len(train), cfg.data.seq_len)
    return train, held
