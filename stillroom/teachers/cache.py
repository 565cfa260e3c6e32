"""The teacher's outputs, computed once: a sharded top-k cache that trains many students many epochs.

`stillroom cache CONFIG` runs the teacher over the config's data (training and held-out examples)
and stores, for every position that carries a loss, the teacher's top-k token ids and log-probs
at the loss temperature, the log of the mass outside them (`losses.TopK`'s tail bucket), and the
teacher's log-prob of the true next token (exact teacher perplexity in the eval). A run with
`teacher.kind=cache teacher.cache=DIR` then trains without loading the teacher.

Layout of DIR:
    index.json                  what the cache is (below) and which samples each shard holds
    shard-00000.safetensors     ids (R, k) uint16 (int32 past 65,536 tokens), logp (R, k) float16|float32, tail (R,) float32,
                                label_logp (R,) float32; R = rows of the shard's samples, in order
    tokenizer/                  the teacher's tokenizer (the student must share it)
    teacher/config.json         the teacher's model config (students built with init=config)

index.json records the teacher, a hash of its vocabulary, k, the temperature, the sequence
length, the dtype, the data it was built from, and every shard's samples as (sample id, rows).
A sample id is a hash of the example's tokens and labels, so lookups are by content: shuffled
epochs, several students and reordered data all find their rows, and data the cache was not built
for is refused (never silently misaligned).

Writing streams: rows are buffered up to `cache.shard_rows`, then written to a temporary file
and renamed, and only then listed in index.json (itself replaced atomically). A killed run loses
at most the unflushed buffer; running the same command again continues from the listed shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stillroom.data.examples import Example
from stillroom.errors import UserError, write_failure
from stillroom.losses import IGNORE_INDEX, TopK, topk_targets
from stillroom.run import faults
from stillroom.run import folders
from stillroom.run.folders import clear, durable_replace, entries, kind_of, usual_mode
from stillroom.teachers.packing import Layout

log = logging.getLogger("stillroom")

FORMAT = "stillroom-cache/1"


def sample_id(e: Example) -> str:
    h = hashlib.sha1()
    h.update(torch.tensor(e.input_ids, dtype=torch.int32).numpy().tobytes())
    h.update(b"|")
    h.update(torch.tensor(e.labels, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:20]


def positions(e: Example) -> list[int]:
    """Positions i whose next token i + 1 carries a loss (the rows the cache stores, in order)."""
    return [i for i in range(len(e.labels) - 1) if e.labels[i + 1] != IGNORE_INDEX]


def tokenizer_hash(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha1(json.dumps(vocab).encode()).hexdigest()[:16]


def write_json(path: Path, obj):
    """An index file (indented by one): written atomically and durably (folders.write_json)."""
    folders.write_json(path, obj, indent=1)


# ------------------------------------------------------------------------------------ writing

def _identity(cfg, tok, vocab: int) -> dict:
    c = cfg.cache
    k = cfg.teacher.served.top_k if cfg.teacher.kind == "served" else c.top_k
    return {"format": FORMAT, "teacher": cfg.teacher.model, "vocab_size": vocab,
            "tokenizer_hash": tokenizer_hash(tok), "top_k": min(k, vocab),
            "temperature": cfg.loss.temperature, "seq_len": cfg.data.seq_len, "dtype": c.dtype,
            "data": {"path": cfg.data.path, "eval_path": cfg.data.eval_path}}


class ShardWriter:
    """Buffers samples' rows and writes them as shards of about `shard_rows` rows: each shard
    under a temporary name, renamed, and only then listed in the index (replaced atomically)."""

    def __init__(self, out: Path, index: dict, shard_rows: int, index_file: str = "index.json",
                 prefix: str = "shard-", layout: Layout | None = None):
        """index_file / prefix: under several processes each lists its shards in its own
        index.pN.json (folded into index.json at the end) and names them shard-pN-...; then
        `layout` is the cache's (how rows are stored: by default packing.Layout.of(index))."""
        self.out, self.index, self.shard_rows = out, index, shard_rows
        self.layout = layout or Layout.of(index)
        self.index_file, self.prefix = index_file, prefix
        self._reset()

    def _reset(self):
        self.buf, self.samples, self.rows = {k: [] for k in self.layout.names}, [], 0

    def add(self, sid: str, ids, logp, tail, label_logp):
        """One sample's rows, on the host, in any dtype: stored as the layout says."""
        for k, v in self.layout.encode(ids, logp, tail, label_logp).items():
            self.buf[k].append(v)
        self.samples.append([sid, int(tail.shape[0])])
        self.rows += int(tail.shape[0])

    def flush_if_full(self):
        """Called between teacher batches: a shard always ends on a batch boundary, so a resumed
        build runs the teacher on exactly the batches an uninterrupted one would (same padding,
        bit-identical rows)."""
        if self.rows >= self.shard_rows:
            self.flush()

    def flush(self):
        from safetensors.torch import save_file

        if not self.samples:
            return
        n, listed = len(self.index["shards"]), {sh["file"] for sh in self.index["shards"]}
        while (name := f"{self.prefix}{n:05d}.safetensors") in listed or (self.out / name).exists():
            n += 1   # a shard taken out of the index (damaged) leaves a gap in the numbers
        tmp = self.out / (name + ".tmp")
        try:
            save_file({k: torch.cat(v) for k, v in self.buf.items()}, str(tmp))
            usual_mode(tmp)
            crc = folders.checksum(tmp)              # verified when the cache is read or continued
            faults.point("cache.shard_written")      # in its temporary file, not yet renamed
            durable_replace(tmp, self.out / name)
            faults.point("cache.shard_renamed")      # renamed, not yet in the index
            self.index["shards"].append({"file": name, "rows": self.rows, "samples": self.samples, "crc": crc})
            write_json(self.out / self.index_file, self.index)
        except Exception as e:
            why = write_failure(e, self.out)
            tmp.unlink(missing_ok=True)
            raise UserError(f"could not write cache shard {name} in {self.out}: {why}; the "
                            f"{len(self.index['shards'])} shards written so far are intact: free space and run "
                            "the same command again to continue") from None
        self._reset()


def existing(cfg, teacher, tok, overwrite=False, skip=()) -> dict | None:
    """The index of the cache already at cache.path if this config continues it; None for a new
    cache; an error if the folder holds something else (unless overwrite). teacher: the model, or
    a served.ServedScorer."""

    out = Path(cfg.cache.path)
    if overwrite or not entries(out):
        return None
    if not (out / "index.json").is_file():
        kind = kind_of(out)
        what = f"a stillroom {kind}" if kind else "not a stillroom cache"
        raise UserError(f"cache.path {out} exists and is {what}: pick another cache.path")
    try:
        index = json.loads((out / "index.json").read_text())
        assert isinstance(index, dict) and isinstance(index.get("shards"), list)
    except (OSError, ValueError, RecursionError, AssertionError):
        raise UserError(f"{out}/index.json is damaged, so what the cache holds is not known: rebuild it with "
                        "--overwrite") from None
    ident = {k: v for k, v in _identity(cfg, tok, _width(teacher)).items() if k not in skip}
    theirs = {k: index.get(k) for k in ident}
    if theirs != ident:
        diff = ", ".join(f"{k}: {theirs[k]!r} there, {ident[k]!r} here" for k in ident if theirs[k] != ident[k])
        raise UserError(f"{out} holds a cache built differently ({diff}); pass --overwrite to replace it "
                        "or set cache.path to another folder")
    return index


def _width(teacher) -> int:
    """The width of the teacher's logits: a model's head, or what a served teacher's config says."""
    from stillroom.models.core import logits_width

    return teacher.width if not isinstance(teacher, torch.nn.Module) else logits_width(teacher)


def _fold_partial(out: Path, index: dict):
    """Shards the processes of a launch listed in their own index.pN.json -> index.json (each is
    complete once listed: a killed launch's are kept, and a rerun continues after them)."""
    for part in sorted(out.glob("index.p*.json")):
        index["shards"] += json.loads(part.read_text())["shards"]
        write_json(out / "index.json", index)
        part.unlink()


def shard_damage(out: Path, shard: dict, checksum: bool = True) -> str | None:
    """Why a listed shard cannot be read as written (None: it is whole): missing, empty, or (with
    `checksum`) another size or not its checksum (shards written before checksums: the first two)."""
    f = out / shard["file"]
    if not f.is_file() or f.stat().st_size == 0:
        return "missing or empty"
    return folders.damage(out, {shard["file"]: shard["crc"]}) if checksum and "crc" in shard else None


def _drop_damaged(out: Path, index: dict):
    """Continuing a cache: a damaged shard is renamed `.damaged` and taken out of the index, so its
    samples are cached again (a line says so)."""
    keep = []
    for shard in index["shards"]:
        why = shard_damage(out, shard)
        if why is None:
            keep.append(shard)
            continue
        f = out / shard["file"]
        if f.exists():
            os.replace(f, f.with_name(f.name + ".damaged"))
        log.warning("cache shard %s is damaged (%s): set aside as %s.damaged; its %d samples are cached again",
                    f, why, f.name, len(shard["samples"]))
    if len(keep) != len(index["shards"]):
        index.update(shards=keep, complete=False)
        write_json(out / "index.json", index)


def _open(cfg, teacher, tok, out: Path, ident: dict, served: bool, config, overwrite: bool) -> dict:
    """The main process's start of a build: the index of the cache to continue (or a new one,
    its folder claimed and the tokenizer, model config and index written), with what a killed run
    left (temporary files, shards renamed in but not listed, damaged shards) cleaned up."""
    index = existing(cfg, teacher, tok, overwrite)
    if index is None:
        from stillroom.models.core import num_params
        clear(out, "cache")
        index = {**ident, "teacher_params": None if served else num_params(teacher), "shards": [],
                 "complete": False}
        if served:
            index["source"] = f"served: {teacher.model} at {teacher.url} ({teacher.api})"
        try:
            tok.save_pretrained(out / "tokenizer")
            if config or not served:
                (config or teacher.config).save_pretrained(out / "teacher")
            write_json(out / "index.json", index)
        except OSError as e:   # a full disk before the first shard: the folder is left empty (and ours)
            why = write_failure(e, out)
            for name in ("tokenizer", "teacher", "index.json", "index.json.tmp"):
                shutil.rmtree(out / name, ignore_errors=True) if (out / name).is_dir() else \
                    (out / name).unlink(missing_ok=True)
            raise UserError(f"could not start the cache in {out}: {why}; free space and run the same command "
                            "again") from None
    for stale in out.glob("*.tmp"):  # a shard being written when a previous run was killed
        stale.unlink()
    _fold_partial(out, index)
    listed = {sh["file"] for sh in index["shards"]}
    for orphan in out.glob("shard-*.safetensors"):   # renamed in by a run killed before it was listed
        if orphan.name not in listed:
            orphan.unlink()
    _drop_damaged(out, index)
    return index


@torch.inference_mode()
def build(cfg, examples, teacher, tok, overwrite=False, progress=True, state=None, config=None) -> dict:
    """Cache the teacher's top-k for `examples` in cfg.cache.path; continue a partial cache.
    state: Accelerate's PartialState under a launch of several processes, which split the
    batches (batch j to process j % N) and write their own shards. The batches are cut from all
    the examples the same way however many processes run and whatever is already cached (a batch
    with anything left to do is run whole), so every sample's rows are the same bit for bit.
    teacher: the model, or a served.ServedScorer (then `config` is the teacher's model config).
    -> the index."""
    served = not isinstance(teacher, torch.nn.Module)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    out = Path(cfg.cache.path)
    vocab = _width(teacher)
    ident = _identity(cfg, tok, vocab)
    if rank == 0:
        index = _open(cfg, teacher, tok, out, ident, served, config, overwrite)
    if world > 1:
        state.wait_for_everyone()
        index = json.loads((out / "index.json").read_text())
    done = {sid for s in index["shards"] for sid, _ in s["samples"]}
    samples, seen = [], set()
    for e in examples:
        sid = sample_id(e)
        if sid not in seen and positions(e):
            seen.add(sid)
            samples.append((sid, e))
    c, T = cfg.cache, cfg.loss.temperature
    batches = [samples[a:a + c.batch_size] for a in range(0, len(samples), c.batch_size)]
    todo = [b for b in batches if any(sid not in done for sid, _ in b)]
    if not todo and index["complete"]:
        log.info("cache %s is complete (%d samples)", out, len(done))
        return index
    if done and rank == 0:
        log.info("cache %s: %d samples already cached, %d to go", out, len(done),
                 sum(sid not in done for b in todo for sid, _ in b))
    mine = todo[rank::world]

    k = ident["top_k"]
    device = "cpu" if served else next(teacher.parameters()).device
    pad = tok.pad_token_id
    writer = (ShardWriter(out, index, c.shard_rows) if world == 1 else
              ShardWriter(out, {"shards": []}, c.shard_rows, f"index.p{rank}.json",
                          f"shard-p{rank}-{len(index['shards']):05d}-", Layout.of(index)))
    label = "cache" if world == 1 else f"cache (process 0 of {world})"
    bar = tqdm(total=sum(len(b) for b in mine), desc=label, unit="sample", disable=not (progress and rank == 0))
    from stillroom.data.examples import collate, model_inputs
    for part in mine:
        if served:   # the server scores the samples not yet cached, `concurrency` at a time
            left = [(sid, e) for sid, e in part if sid not in done]
            for (sid, e), (ids, logp, tail, label_logp) in zip(left, teacher.many([e for _, e in left])):
                writer.add(sid, ids, logp, tail, label_logp)
            writer.flush_if_full()
            faults.point("cache.batch")
            bar.update(len(part))
            continue
        b = {kk: v.to(device) for kk, v in collate([e for _, e in part], pad).items()}
        logits = teacher(**model_inputs(b), use_cache=False).logits
        for j, (sid, e) in enumerate(part):
            if sid in done:
                continue
            pos = torch.tensor(positions(e), device=device)
            lg = logits[j, pos]                                    # (n, V): only rows with a loss
            top = topk_targets(lg, k, T)
            nxt = torch.tensor(e.labels, device=device)[pos + 1]
            label_logp = torch.log_softmax(lg.float(), -1).gather(-1, nxt[:, None]).squeeze(-1)
            # stored from the host: uint16 has little support on CUDA
            writer.add(sid, top.ids.cpu(), top.logp.float().cpu(), top.log_tail.float().cpu(), label_logp.float().cpu())
        del logits
        writer.flush_if_full()
        faults.point("cache.batch")
        bar.update(len(part))
    writer.flush()
    bar.close()
    if world > 1:
        state.wait_for_everyone()
        if rank != 0:
            return index
        _fold_partial(out, index)
    index["complete"] = True
    write_json(out / "index.json", index)
    return index


def start_import(cfg, tok, model_config, overwrite: bool, source: str, dtype: str) -> dict:
    """A new cache at cache.path for targets read from a file (no teacher runs): the folder
    claimed (--overwrite replaces only a stillroom cache), the tokenizer and model config saved,
    and the index started. -> the index (its shards to come, `complete` False)."""
    from stillroom.run.folders import check_replace

    out = Path(cfg.cache.path)
    if entries(out):
        if not overwrite:
            raise UserError(f"cache.path {out} exists; pass --overwrite to replace it (a stillroom cache only) "
                            "or set cache.path to another folder")
        check_replace(out, "cache", [cfg.data.path, cfg.data.eval_path], key="cache.path")
    clear(out, "cache")
    tok.save_pretrained(out / "tokenizer")
    if model_config is not None:
        model_config.save_pretrained(out / "teacher")
    index = {"format": FORMAT, "teacher": cfg.teacher.model, "source": source, "vocab_size": len(tok),
             "tokenizer_hash": tokenizer_hash(tok), "top_k": cfg.cache.top_k, "temperature": 1.0,
             "seq_len": cfg.data.seq_len, "dtype": dtype, "data": {"path": cfg.data.path, "eval_path": cfg.data.eval_path},
             "teacher_params": None, "shards": [], "complete": False}
    write_json(out / "index.json", index)
    return index


def summary(path: Path) -> dict:
    index = json.loads((Path(path) / "index.json").read_text())
    rows = sum(s["rows"] for s in index["shards"])
    size = sum((Path(path) / s["file"]).stat().st_size for s in index["shards"])
    return {"samples": sum(len(s["samples"]) for s in index["shards"]), "rows": rows, "bytes": size,
            "bytes_per_token": size / max(rows, 1), "top_k": index["top_k"], "dtype": index["dtype"]}


# ------------------------------------------------------------------------------------ reading

@dataclass
class CachedTargets:
    """One batch's cached teacher outputs, laid out like its logits (B, S, ...)."""
    top: TopK                 # (B, S, k) targets; rows without a loss hold a harmless dummy
    label_logp: torch.Tensor  # (B, S) teacher log-prob of the true next token (0 where no loss)


def batch_targets(examples: list[Example], rows: list, seq_len: int, k: int, device) -> CachedTargets:
    """A batch's targets laid out like its logits (B, seq_len, ...), from each example's four rows
    over positions(e) (None for an example without any); the other positions hold a harmless dummy."""
    B = len(examples)
    ids = torch.zeros(B, seq_len, k, dtype=torch.long)
    logp = torch.zeros(B, seq_len, k, dtype=torch.float32)      # dummy rows: p = 1 on token 0
    tail = torch.full((B, seq_len), float("-inf"))
    label_logp = torch.zeros(B, seq_len)
    for b, (e, r) in enumerate(zip(examples, rows)):
        if r is None:
            continue
        p = torch.tensor(positions(e))
        ids[b, p], logp[b, p], tail[b, p], label_logp[b, p] = r[0].long(), r[1].float(), r[2], r[3]
    return CachedTargets(TopK(ids.to(device), logp.to(device), tail.to(device)), label_logp.to(device))


class TeacherCache:
    """Read side: looks samples up by id, reads their rows from memory-mapped shards."""

    def __init__(self, path):
        self.path = Path(path)
        f = self.path / "index.json"
        if not f.is_file():
            raise UserError(f"teacher.cache={path}: no index.json there; build one with `stillroom cache`")
        try:
            self.index = json.loads(f.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{f} is not valid JSON: the cache is damaged; rebuild it with `stillroom cache`") from None
        if self.index.get("format") != FORMAT:
            raise UserError(f"{path} is not a {FORMAT} cache (format {self.index.get('format')!r})")
        if not self.index.get("complete"):
            raise UserError(f"the cache in {path} is incomplete: run the same `stillroom cache` command "
                            "again to finish it")
        self.where = {}
        for n, s in enumerate(self.index["shards"]):
            start = 0
            for j, (sid, rows) in enumerate(s["samples"]):
                self.where[sid] = (n, start, rows, j)
                start += rows
        self.layout = Layout.of(self.index)
        self._open, self._code_at = {}, {}
        self._lock = threading.Lock()

    @property
    def top_k(self) -> int:
        return self.index["top_k"]

    @property
    def temperature(self) -> float:
        return self.index["temperature"]

    def tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path / "tokenizer")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def teacher_config(self):
        from transformers import AutoConfig

        if not (self.path / "teacher" / "config.json").is_file():
            return None
        return AutoConfig.from_pretrained(self.path / "teacher")

    def check(self, cfg, tok, examples: dict[str, list[Example]] | None = None):
        """Refuse a cache built for another tokenizer, sequence length, temperature or data
        (`examples`: name -> examples that must all be in the cache)."""
        ix = self.index
        for n in range(len(ix["shards"])):
            self._shard_file(n, verify=True)
        if tokenizer_hash(tok) != ix["tokenizer_hash"]:
            raise UserError(f"the cache in {self.path} was built with another tokenizer (teacher "
                            f"{ix['teacher']}, vocab {ix['vocab_size']}) than this student's (vocab {len(tok)})")
        if cfg.data.seq_len != ix["seq_len"]:
            raise UserError(f"the cache in {self.path} was built with data.seq_len={ix['seq_len']}, "
                            f"this run has {cfg.data.seq_len}: set data.seq_len={ix['seq_len']} or rebuild the cache")
        from stillroom.objectives.rules import teacher_terms, weighed_terms
        soft = any(k != "hard" for k in teacher_terms(weighed_terms(cfg)))   # a term that reads it at loss.temperature
        if soft and abs(cfg.loss.temperature - ix["temperature"]) > 1e-9:
            raise UserError(f"the cache in {self.path} holds the teacher at temperature {ix['temperature']}, "
                            f"this run has loss.temperature={cfg.loss.temperature}: set it to "
                            f"{ix['temperature']} or build a cache at this temperature")
        for name, exs in (examples or {}).items():
            missing = sum(1 for e in exs if positions(e) and sample_id(e) not in self.where)
            if missing:
                raise UserError(f"the cache in {self.path} has no entry for {missing} of the {len(exs)} {name} "
                                f"examples: it was built for other data ({ix['data']['path']}); "
                                "build a cache for this data")

    def _shard_file(self, n, verify: bool = False) -> Path:
        shard = self.index["shards"][n]
        f = self.path / shard["file"]
        why = shard_damage(self.path, shard, checksum=verify)
        if why is not None:
            raise UserError(f"cache shard {f} is damaged ({why}): run the `stillroom cache` command that built "
                            "it again, which caches that shard's samples again and keeps the rest")
        return f

    def _shard(self, n):
        from safetensors import safe_open

        with self._lock:   # the training loop's prefetch thread reads too
            if n not in self._open:
                self._open[n] = safe_open(str(self._shard_file(n)), framework="pt")
            return self._open[n]

    def rows(self, e: Example):
        """(ids, log-probs, tail, true-token log-probs) at the example's positions with a loss."""
        sid = sample_id(e)
        if sid not in self.where:
            raise UserError(f"the cache in {self.path} has no entry for an example of this run "
                            "(built for other data?)")
        return self.read(sid)

    def read(self, sid: str):
        """rows() of the sample with id `sid` (one the index lists)."""
        n, start, count, j = self.where[sid]
        f = self._shard(n)
        t = {name: f.get_slice(name)[start:start + count] for name in self.layout.per_row}
        if self.layout.packed:
            with self._lock:
                if n not in self._code_at:    # where each sample's ids begin in the shard's bit streams
                    self._code_at[n] = [0] + f.get_tensor("code_bytes").cumsum(0).tolist()
                at = self._code_at[n]
            t["code"] = f.get_slice("code")[at[j]:at[j + 1]]
        return self.layout.decode(t)

    def targets(self, examples: list[Example], seq_len: int, device) -> CachedTargets:
        """Targets for a collated batch of `examples` (right-padded to `seq_len` positions)."""
        return batch_targets(examples, [self.rows(e) if positions(e) else None for e in examples], seq_len,
                             self.top_k, device)
