"""Data: text / JSONL / chat / Hugging Face datasets -> token examples -> padded batches.

Every example is (input_ids, labels) with IGNORE_INDEX on tokens that carry no loss (prompts,
system text, padding). Plain text (and JSONL `text` rows) is packed into fixed-length blocks;
`prompt`+`response` and chat `messages` rows are one example each, rendered with the tokenizer's
chat template, with the loss only on the assistant's tokens.
"""
from __future__ import annotations

import functools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .feedback import bar
from .losses import IGNORE_INDEX
from .rows import read_row, row_keys

log = logging.getLogger("stillroom")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    segments: tuple[int, ...] | None = None
    """Lengths of the documents packed into this example, in order (None: one document). Each
    attends only to itself (position ids restart per document) and the first token of a document
    is never a target, so nothing leaks across a boundary."""
    route: str | None = None
    """The name of the teacher this example is routed to (teacher.route_field), if any."""


@dataclass
class Report:
    """What happened to the rows of one source: bad rows are listed, never silently dropped."""
    source: str
    rows: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)      # (row number, reason)
    truncated: int = 0
    no_target: list[int] = field(default_factory=list)            # rows with nothing to learn
    bad_total: int | None = None          # when `bad` / `no_target` keep only the first few (a store's report)
    no_target_total: int | None = None

    def describe_bad(self) -> str:
        total = self.bad_total or len(self.bad)
        shown = ", ".join(f"{n} ({why})" for n, why in self.bad[:5])
        more = f" and {total - 5} more" if total > 5 else ""
        return f"{total} of {self.rows} rows in {self.source} are bad: row {shown}{more}"


# ---------------------------------------------------------------------------------- reading rows

def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "hf"
    if p.suffix in (".jsonl", ".json"):
        return "jsonl"
    if p.suffix in (".txt", ".md", ".text", ""):
        return "text" if p.exists() or p.suffix else "hf"
    return "text"


def read_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = path.read_bytes()[:e.start].count(b"\n") + 1
        raise UserError(f"data file {path} is not UTF-8 text (line {line_no}); re-encode it as UTF-8") from None
    rows, bad = [], []
    for n, got in parse_jsonl(text):
        (bad if isinstance(got, str) else rows).append((n, got))
    return rows, bad


def parse_jsonl(text: str):
    """(line number, row) for each JSON object line of `text`, or (line number, why it is not one);
    blank lines are skipped. (The data store parses its shards of a file with it too.)"""
    for n, line in enumerate(text.split("\n"), 1):   # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, f"invalid JSON: {e.msg}"
            continue
        if not isinstance(row, dict):
            yield n, "not a JSON object"
        elif broken_unicode(row):
            yield n, "invalid Unicode (a lone surrogate escape such as \\ud800)"
        else:
            yield n, row


def broken_unicode(value) -> bool:
    """JSON's \\uXXXX escapes can spell a lone UTF-16 surrogate: valid JSON, but not text any
    tokenizer (or UTF-8 file) can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if isinstance(value, dict):
        return any(broken_unicode(v) for v in value.values())
    if isinstance(value, list):
        return any(broken_unicode(v) for v in value)
    return False


def read_hf(path: str, split: str, lazy: bool = False, streaming: bool = False):
    """-> [(row number, row)], or with lazy the datasets.Dataset itself (memory-mapped); streaming:
    a hub dataset read as it downloads (datasets' IterableDataset), nothing of it kept on disk."""
    import datasets

    p = Path(path)
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                           or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"dataset {path} has splits {list(ds)}; set data.split to one")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(p) if p.exists() else path, split=split,
                                       **({"streaming": True} if streaming else {}))
    except UserError:
        raise
    except Exception as e:
        hint = "" if p.exists() else " (a hub id needs network access; pass a local file or folder)"
        raise UserError(f"could not load dataset '{path}': {str(e).splitlines()[0][:200]}{hint}") from None
    return ds if lazy else [(i + 1, dict(row)) for i, row in enumerate(ds)]


def check_source(path: str, fmt: str):
    """A data file exists, is a regular file and is not empty (before any tokenizer is loaded)."""
    p = Path(path)
    if fmt in ("text", "jsonl"):
        if not p.exists():
            raise UserError(f"data file not found: {path}")
        if p.is_dir():
            raise UserError(f"data.path {path} is a folder; set data.format=hf for a dataset folder")
        if not p.is_file():   # a FIFO, a device (/dev/zero) or a socket: no size, maybe no end
            raise UserError(f"data file {path} is not a regular file (a pipe, device or socket); "
                            "write the data to a file and pass that")
        if p.stat().st_size == 0:
            raise UserError(f"data file {path} is empty")


def _read(path: str, fmt: str, split: str) -> tuple[str, object, Report]:
    """-> (kind, payload, report); kind "text" has the file's text, "rows" a list of (n, dict)."""
    fmt = detect_format(path, fmt)
    p = Path(path)
    check_source(path, fmt)
    report = Report(source=str(path))
    if fmt == "text":
        try:
            text = p.read_text(encoding="utf-8-sig")   # a byte-order mark is not text
        except UnicodeDecodeError:
            raise UserError(f"data file {path} is not UTF-8 text") from None
        if not text.strip():
            raise UserError(f"data file {path} has no text")
        report.rows = 1
        return "text", text, report
    if fmt == "jsonl":
        rows, bad = read_jsonl(p)
    else:
        rows, bad = read_hf(path, split), []
    report.rows = len(rows) + len(bad)
    report.bad.extend(bad)
    return "rows", rows, report


# ---------------------------------------------------------------------------------- rendering

def _chat_problem(msgs) -> str | None:
    if not any(m["role"] == "assistant" for m in msgs):
        if msgs and all(m["role"] in ("user", "system") for m in msgs):
            return ("no assistant message to learn from (only prompts: answer them first with "
                    "stillroom generate --prompts FILE)")
        return "no assistant message to learn from"
    return None


_FAST: dict = {}   # (what, id(tokenizer)[, template]) -> (the tokenizer, its checked fast function)


def _encoder(tokenizer):
    """enc(text) -> (ids, character offsets), as tokenizer(text, add_special_tokens=False,
    return_offsets_mapping=True) gives them; for a fast tokenizer its Rust backend called directly
    (what transformers calls, without the per-call conversion), checked against the reference on
    sample texts once per tokenizer."""
    cached = _FAST.get(("encode", id(tokenizer)))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]

    def slow(t):
        e = tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
        return e["input_ids"], e["offset_mapping"]

    enc = slow
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        def fast(t):
            e = backend.encode(t, add_special_tokens=False)
            return e.ids, e.offsets

        samples = ["Hello, world!", " two  spaces\n\nand lines\t", "accents é, 日本語, emoji 🙂",
                   f"{tokenizer.eos_token or ''}special{tokenizer.bos_token or ''} tokens", ""]
        try:
            if all(tuple(map(list, fast(t))) == (list(slow(t)[0]), [tuple(o) for o in slow(t)[1]]) for t in samples):
                enc = fast
        except Exception:
            pass
    _FAST[("encode", id(tokenizer))] = (tokenizer, enc)
    return enc


def encode_head(tokenizer, text: str, limit: int | None) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of `text`, at least its first `limit` tokens exact. A text far longer
    than `limit` tokens is cut to `limit` anyway, so only a prefix is tokenized: one long enough
    that the first limit + 1 tokens agree with those of a prefix twice as long (a 20 MB row costs
    a few kB of work, not a minute). Short texts, and limit None, are tokenized whole."""
    enc = _encoder(tokenizer)

    if limit is not None:
        size = max(4096, 64 * limit)
        while 2 * size < len(text):
            a, b = enc(text[:size]), enc(text[:2 * size])
            n = limit + 1
            if len(a[0]) > n + 8 and a[0][:n] == b[0][:n] and list(a[1][:n]) == list(b[1][:n]):
                return a
            size *= 4
    return enc(text)


def chat_renderer(tokenizer):
    """render(messages, add_generation_prompt) -> the chat template's text, as
    tokenizer.apply_chat_template(..., tokenize=False) gives it. For plain {role, content} messages
    that is the compiled template rendered with the special tokens, which is what transformers
    does after converting the messages; calling the compiled template directly skips that
    conversion (most of a render's time). Checked against apply_chat_template on sample
    conversations once per template: where they differ, apply_chat_template is used."""
    template = tokenizer.chat_template
    cached = _FAST.get(("render", id(tokenizer), template))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]

    def slow(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    render = slow
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled, kw = _compile_jinja_template(template), dict(tokenizer.special_tokens_map)

        def fast(msgs, gen):
            return compiled.render(messages=[dict(m) for m in msgs], tools=None, documents=None,
                                   add_generation_prompt=gen, **kw)

        samples = [[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello!\n"}],
                   [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
        if all(fast(c[:k], g) == slow(c[:k], g) for c in samples for k in range(1, len(c) + 1) for g in (False, True)):
            render = fast
    except Exception:   # a template that needs what only apply_chat_template gives: use it
        pass
    _FAST[("render", id(tokenizer), template)] = (tokenizer, render)
    return render


SENTINEL = "\ue000stillroom\ue001"   # private-use characters: no real answer holds them


def _one_render(tokenizer, render):
    """f(messages ending with an answer) -> (their text, where the answer's turn starts) from a
    single render: the answer replaced by a sentinel, found, and put back. Used only for templates
    where that is exactly what rendering the conversation and its prompt (with the generation
    prompt) give, checked on sample conversations once per template; else None."""
    key = ("one", id(tokenizer), tokenizer.chat_template)
    cached = _FAST.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]

    def one(msgs):
        text = render(msgs[:-1] + [{**msgs[-1], "content": SENTINEL}], False)
        at = text.find(SENTINEL)
        if at < 0 or text.count(SENTINEL) != 1:
            raise ValueError("the template does not render the answer verbatim")
        return text.replace(SENTINEL, msgs[-1]["content"]), at

    samples = [[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello!\n"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "  d  "}]]
    try:
        ok = all(one(c) == (render(c, False), len(render(c[:-1], True))) for c in samples)
    except Exception:
        ok = False
    _FAST[key] = (tokenizer, one if ok else None)
    return one if ok else None


def render_chat(tokenizer, messages: list[dict], cut: bool = False, limit: int | None = None):
    """Chat template -> (ids, labels) with labels only on assistant turns (end-of-turn included).
    cut: the last answer was cut off (generate's `truncated`): its end-of-turn is not a target,
    so the student never learns to stop where the answer was only cut. limit: only the first
    `limit` tokens are needed exactly (encode_head)."""
    render = chat_renderer(tokenizer)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    one = _one_render(tokenizer, render) if last == len(messages) - 1 and messages[-1]["content"] is not None \
        and SENTINEL not in messages[-1]["content"] else None
    if one is not None:   # the common row, ending with its answer: one render gives the text and where it starts
        text, last_start = one(messages)
    else:
        text, last_start = render(messages, False), None
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = last_start if i == len(messages) - 1 and last_start is not None else len(render(messages[:i], True))
            end = len(text) if i == len(messages) - 1 else len(render(messages[:i + 1], False))
            if cut and i == last:
                at = text.find(m["content"], start, end)
                end = at + len(m["content"]) if at >= 0 and m["content"] else end
            spans.append((start, end))
    ids, offsets = encode_head(tokenizer, text, limit)
    import numpy as np

    starts = np.fromiter((s for s, _e in offsets), dtype=np.int64, count=len(ids))
    mine = np.zeros(len(ids), dtype=bool)
    for a, b in spans:   # a token is a target where its first character lies in an assistant turn
        mine |= (starts >= a) & (starts < b)
    labels = np.where(mine, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
    return ids, labels


def render_pair(tokenizer, prompt: str, response: str, cut: bool = False, limit: int | None = None):
    if tokenizer.chat_template:
        return render_chat(tokenizer, [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": response}], cut, limit)
    p = encode_head(tokenizer, prompt + "\n", limit)[0]
    r = encode_head(tokenizer, response, limit)[0] + ([] if cut else [tokenizer.eos_token_id])
    return p + r, [IGNORE_INDEX] * len(p) + r


def pack(ids: list[int], seq_len: int) -> list[Example]:
    """One document -> fixed-length blocks; a short tail block is kept if it has at least 2 tokens."""
    out = [Example(ids[i:i + seq_len], ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    return [e for e in out if len(e.input_ids) >= 2]


def _joined(parts: list[Example]) -> Example:
    """Examples side by side in one row, each attending only to itself (see Example.segments)."""
    if len(parts) == 1:
        return parts[0]
    ids, labels = [], []
    for e in parts:
        ids += e.input_ids
        labels += [IGNORE_INDEX] + e.labels[1:]   # a document's first token is not predicted
    # a part that is itself packed keeps its own boundaries
    return Example(ids, labels, tuple(n for e in parts for n in (e.segments or (len(e.input_ids),))))


def pack_documents(docs: list[list[int]], seq_len: int) -> list[Example]:
    """Documents (token lists) -> blocks of seq_len tokens, cut where the stream reaches seq_len
    (a long document continues in the next block), with boundaries kept per block."""
    blocks, cur, room = [], [], seq_len
    for doc in docs:
        while doc:
            part, doc = doc[:room], doc[room:]
            cur.append(Example(part, list(part)))
            room -= len(part)
            if room == 0:
                blocks.append(cur)
                cur, room = [], seq_len
    if cur:
        blocks.append(cur)
    return [_joined(b) for b in blocks if sum(len(e.input_ids) for e in b) >= 2]


def pack_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Whole examples (each <= seq_len) into as few seq_len rows as first-fit decreasing finds,
    so batches carry almost no padding. Deterministic for given examples."""
    return [_joined([examples[i] for i in b]) for b in ffd_bins([len(e.input_ids) for e in examples], seq_len)]


def ffd_bins(sizes: list[int], seq_len: int) -> list[list[int]]:
    """First-fit decreasing: item indices into bins of seq_len, each bin's indices in order (the
    data store packs by the same function, on lengths alone)."""
    import bisect

    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []   # (room left, bin) sorted: the best fit is the first that fits
    for i in order:
        n = sizes[i]
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            room, b = seq_len - n, len(bins) - 1
        else:
            room, b = free.pop(j)
            bins[b].append(i)
            room -= n
        if room > 1:
            bisect.insort(free, (room, b))
    return [sorted(b) for b in bins]


def row_doc(row: dict, tokenizer, dcfg, route_field: str | None = None, routes: list[str] | None = None) -> tuple:
    """One row -> ("bad", why) | ("text", ids): a document to pack | ("example", ids, labels,
    route, truncated) | ("no_target", truncated): nothing to learn within seq_len. A text row
    routed to a teacher is one example of its own (cut to seq_len), so it keeps its teacher."""
    got = read_row(row, dcfg.fields)
    if isinstance(got, str):
        return "bad", got
    route = None
    if route_field:
        route = row.get(route_field)
        if route not in routes:
            return "bad", f"{route_field}={route!r} names no teacher (teachers: {', '.join(routes)})"
    if got.text is not None:
        ids = tokenizer(got.text, add_special_tokens=False)["input_ids"]
        ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if not route_field:
            return "text", ids
        if len(ids) < 2:
            return "no_target", False
        return "example", ids[:dcfg.seq_len], ids[:dcfg.seq_len], route, False
    msgs, cut = got.messages, row.get("truncated") is True
    why = _chat_problem(msgs)
    if why is None and got.pair and not msgs[-1]["content"].strip():
        why = "empty response"
    if why is None and not (got.pair or tokenizer.chat_template):
        why = "chat messages need a tokenizer with a chat template"
    if why:
        return "bad", why
    if got.pair:
        ids, labels = render_pair(tokenizer, msgs[0]["content"], msgs[1]["content"], cut, dcfg.seq_len)
    else:
        ids, labels = render_chat(tokenizer, msgs, cut, dcfg.seq_len)
    truncated = len(ids) > dcfg.seq_len
    ids, labels = ids[:dcfg.seq_len], labels[:dcfg.seq_len]
    if all(t == IGNORE_INDEX for t in labels[1:]):
        return "no_target", truncated
    return "example", ids, labels, route, truncated


def in_memory(data, name: str) -> tuple[str, object, Report]:
    """Rows given in memory (the library's Distiller) -> what _read gives for a file: a list of
    strings or of dicts (JSONL rows), or a datasets.Dataset."""
    if isinstance(data, str) or not hasattr(data, "__iter__"):
        raise UserError(f"{name}: give a list of texts or of row dicts, or a datasets.Dataset "
                        f"(got {type(data).__name__})")
    rows = []
    for i, row in enumerate(data):
        if isinstance(row, str):
            row = {"text": row}
        elif not isinstance(row, dict):
            row = dict(row)
        rows.append((i + 1, row))
    if not rows:
        raise UserError(f"{name} is empty")
    return "rows", rows, Report(source=name, rows=len(rows))


def build_examples(path, tokenizer, dcfg, route_field: str | None = None,
                   routes: list[str] | None = None) -> tuple[list[Example], Report]:
    """path: a data path, or rows in memory as in_memory() reads them (a (kind, payload, report)).
    route_field: each row names its teacher in this field (one of `routes`); such rows are
    never packed together (text rows become one example each, cut to seq_len)."""
    kind, payload, report = path if isinstance(path, tuple) else _read(path, dcfg.format, dcfg.split)
    path = report.source
    if route_field and kind == "text":
        raise UserError(f"teacher.route_field={route_field} needs JSONL or dataset rows carrying that field; "
                        f"{path} is plain text")
    if kind == "text":
        size = len(payload.encode("utf-8", "replace"))
        if size > 1 << 20:
            log.info("tokenizing %s (%.1f MB of text)", path, size / 2**20)
        ids = tokenizer(payload, add_special_tokens=False)["input_ids"]
        examples = pack(ids, dcfg.seq_len)
    else:
        examples, docs = [], []
        for n, row in bar(payload, desc=f"tokenizing {Path(path).name}", unit="row"):
            got = row_doc(row, tokenizer, dcfg, route_field, routes)
            if got[0] == "bad":
                report.bad.append((n, got[1]))
            elif got[0] == "text":
                docs.append(got[1])
            elif got[0] == "no_target":
                report.truncated += got[1]
                report.no_target.append(n)
            else:
                _, ids, labels, route, cut = got
                report.truncated += cut
                examples.append(Example(ids, labels, route=route))
        examples += pack_documents(docs, dcfg.seq_len)
    if dcfg.max_examples:
        examples = examples[:dcfg.max_examples]
    check_report(report, dcfg, len(examples), (lambda: row_keys(payload)) if kind == "rows" else None)
    return examples, report


def check_report(report: Report, dcfg, n_examples: int, keys=None):
    """What a source's rows came to: a refusal when every row is bad (keys(): the keys the rows do
    have, most common first; None for plain text), or some are and data.skip_bad_rows is off, or
    no example is left; else warnings for the skipped, cut and empty rows."""
    path = report.source
    if report.bad:
        report.bad.sort()
        if keys is not None and len(report.bad) == report.rows:
            names = keys()
            have = f"its rows have the keys {', '.join(names[:12])}" if names else "no row is a JSON object"
            raise UserError(f"no row of {path} is usable (row {report.bad[0][0]}: {report.bad[0][1]}); {have}: "
                            "name the prompt and response with data.fields={prompt: KEY, response: KEY} "
                            "(formats: README, 'Data formats')")
        if not dcfg.skip_bad_rows:
            raise UserError(report.describe_bad() + "; fix them or set data.skip_bad_rows=true")
    report_notes(report, dcfg)
    if not n_examples:
        raise UserError(f"no usable examples in {path}")


def report_notes(report: Report, dcfg):
    """The warnings about a source's skipped, cut and empty rows (said again when a store is reused)."""
    if report.bad:
        log.warning("skipped %s", report.describe_bad())
    if report.truncated:
        log.info("%d of %d rows in %s were longer than data.seq_len=%d and were truncated",
                 report.truncated, report.rows, report.source, dcfg.seq_len)
    if report.no_target:
        log.warning("skipped %d rows of %s with no response token within data.seq_len=%d: rows %s",
                    report.no_target_total or len(report.no_target), report.source, dcfg.seq_len,
                    report.no_target[:10])


def split_examples(examples: list[Example], fraction: float, seed: int):
    """Deterministic held-out split: the same data, fraction and seed give the same split."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def uses_store(cfg, rows=None, eval_rows=None) -> bool:
    return rows is None and eval_rows is None and cfg.data.path is not None and cfg.data.store != "off"


def load_data(cfg, tokenizer, rows=None, eval_rows=None, build: bool = True):
    """-> (train examples, eval examples) for a config; `rows` / `eval_rows`: data in memory (see
    in_memory) instead of data.path / data.eval_path. A data file is read through the data store
    (store.py: tokenized once, read by index; build=False opens it only) unless data.store=off."""
    t = getattr(cfg, "teacher", None)
    field_ = getattr(t, "route_field", None)
    routes = [t.name] + [m.name for m in t.mix] if field_ else None
    if uses_store(cfg, rows, eval_rows):
        from .store import open_or_build
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


# ---------------------------------------------------------------------------------- batching

def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. labels are *unshifted* (position i = token i). A batch
    holding packed examples also gets position_ids restarting at every document (and at the
    padding), which is how transformers keeps packed documents from attending to each other."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any(e.segments for e in examples)
    pos = torch.zeros((len(examples), width), dtype=torch.long) if packed else None
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
        if packed:
            at = 0
            for length in (*(e.segments or (n,)), width - n):
                pos[i, at:at + length] = torch.arange(length)
                at += length
    out = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    if packed:
        out["position_ids"] = pos
    return out


def model_inputs(b) -> dict:
    """What a model is called with, from a collated batch (dict or object): packed batches pass
    position_ids and no attention mask (transformers then builds the per-document mask). Call the
    model with use_cache=False: transformers ignores packing when it builds a KV cache."""
    get = b.get if isinstance(b, dict) else lambda k: getattr(b, k, None)
    if get("position_ids") is not None:
        return {"input_ids": get("input_ids"), "position_ids": get("position_ids")}
    return {"input_ids": get("input_ids"), "attention_mask": get("attention_mask")}


def micro_batch(examples: list[Example], index: int, batch_size: int, seed: int) -> list[Example]:
    """The `index`-th micro-batch of an endless, seeded, epoch-shuffled stream (a pure function of
    its arguments, so resuming at a step reproduces the exact data order)."""
    per_epoch = max(1, len(examples) // batch_size)
    epoch, k = divmod(index, per_epoch)
    order = epoch_order(len(examples), seed, epoch)
    return [examples[int(i)] for i in order[k * batch_size:(k + 1) * batch_size]]


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int):
    """The shuffled order of epoch `epoch`, made once per epoch (not per micro-batch: at millions of
    examples a shuffle is seconds), kept as an int64 array (8 bytes an example)."""
    import numpy as np

    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return np.asarray(order, dtype=np.int64)


def eval_batches(examples: list[Example], batch_size: int, max_batches=None):
    for n, a in enumerate(range(0, len(examples), batch_size)):
        if max_batches and n >= max_batches:
            return
        yield examples[a:a + batch_size]
