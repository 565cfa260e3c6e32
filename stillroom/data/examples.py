"""Data: text / JSONL / chat / Hugging Face datasets -> token examples -> padded batches.

Every example is (input_ids, labels) with IGNORE_INDEX on tokens that carry no loss (prompts,
system text, padding). Plain text (and JSONL `text` rows) is packed into fixed-length blocks;
`prompt`+`response` and chat `messages` rows are one example each, rendered with the tokenizer's
chat template, with the loss only on the assistant's tokens.
"""
from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stillroom.data.render import render_chat, render_pair
from stillroom.data.rows import check_source, detect_format, read_hf, read_jsonl, read_row, row_keys, text_ids
from stillroom.errors import UserError
from stillroom.losses import IGNORE_INDEX, shift_labels
from stillroom.run.feedback import bar

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


# ---------------------------------------------------------------------------------- rows -> examples

def _read(path: str, fmt: str, split: str) -> tuple[str, object, Report]:
    """-> (kind, payload, report); kind "text" has the file's path (checked: read it with
    text_ids), "rows" a list of (n, dict)."""
    fmt = detect_format(path, fmt)
    check_source(path, fmt)
    report = Report(source=str(path))
    if fmt == "text":
        report.rows = 1
        return "text", path, report
    if fmt == "jsonl":
        rows, bad = read_jsonl(Path(path))
    else:
        rows, bad = read_hf(path, split), []
    report.rows = len(rows) + len(bad)
    report.bad.extend(bad)
    return "rows", rows, report


def _chat_problem(msgs) -> str | None:
    if not any(m["role"] == "assistant" for m in msgs):
        if msgs and all(m["role"] in ("user", "system") for m in msgs):
            return ("no assistant message to learn from (only prompts: answer them first with "
                    "stillroom generate --prompts FILE)")
        return "no assistant message to learn from"
    return None


# ---------------------------------------------------------------------------------- examples and packing

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
    ids = row.get("input_ids", row.get("prompt_token_ids")) if isinstance(row, dict) else None
    if ids is not None:   # already tokenized (a logit capture's rows): used as they are
        return _token_row(row, ids, tokenizer, dcfg)
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
    if labels[1:].count(IGNORE_INDEX) == max(0, len(labels) - 1):   # nothing to learn (list.count: C speed)
        return "no_target", truncated
    return "example", ids, labels, route, truncated


def _token_row(row: dict, ids, tokenizer, dcfg) -> tuple:
    """A pre-tokenized row: `input_ids` (or vLLM's `prompt_token_ids`), and `labels` (-100 where no
    loss) or every token a target. Its ids must be the tokenizer's."""
    labels = row.get("labels", ids)
    ok = lambda v: isinstance(v, list) and all(type(x) is int for x in v)   # noqa: E731
    if not ok(ids) or not ok(labels) or len(labels) != len(ids):
        return "bad", "input_ids / labels must be lists of integers of one length"
    if any(not 0 <= x < len(tokenizer) for x in ids):
        return "bad", f"a token id outside the tokenizer's vocabulary (0..{len(tokenizer) - 1})"
    truncated = len(ids) > dcfg.seq_len
    ids, labels = ids[:dcfg.seq_len], labels[:dcfg.seq_len]
    if labels[1:].count(IGNORE_INDEX) == max(0, len(labels) - 1):
        return "no_target", truncated
    return "example", list(ids), list(labels), None, truncated


def tokenize_rows(rows, tokenizer, dcfg, report: Report, add, route_field: str | None = None,
                  routes: list[str] | None = None, keys=None):
    """(row number, row dict or why it is bad) pairs -> add(ids, labels, route) per example, or
    add(ids, None, None) per text document (to be packed); the bad, cut and empty rows go in
    `report`. keys: a Counter of the rows' keys (up to 1000 distinct), for the error when no row
    is usable. What data.build_examples and the store's build workers both run."""
    for n, row in rows:
        if isinstance(row, str):
            report.bad.append((n, row))
            continue
        if keys is not None and len(keys) < 1000:
            keys.update(row.keys())
        got = row_doc(row, tokenizer, dcfg, route_field, routes)
        if got[0] == "bad":
            report.bad.append((n, got[1]))
        elif got[0] == "text":
            add(got[1], None, None)
        elif got[0] == "no_target":
            report.truncated += got[1]
            report.no_target.append(n)
        else:
            _, ids, labels, route, cut = got
            report.truncated += cut
            add(ids, labels, route)


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
        examples = pack(text_ids(payload, tokenizer), dcfg.seq_len)
    else:
        examples, docs = [], []

        def add(ids, labels, route):
            if labels is None:
                docs.append(ids)
            else:
                examples.append(Example(ids, labels, route=route))

        tokenize_rows(bar(payload, desc=f"tokenizing {Path(path).name}", unit="row"), tokenizer, dcfg,
                      report, add, route_field, routes)
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
                            "(formats: docs/data.md)")
        if not dcfg.skip_bad_rows:
            raise UserError(report.describe_bad() + "; fix them or set data.skip_bad_rows=true")
    report_notes(report, dcfg)
    if not n_examples:
        nothing = report.no_target_total or len(report.no_target)
        why = (f": in all {nothing} rows the prompt fills data.seq_len={dcfg.seq_len} and leaves no answer token to "
               "learn; raise data.seq_len") if report.rows and nothing >= report.rows else ""
        raise UserError(f"no usable examples in {path}{why}")


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


@dataclass
class Batch:
    """One micro-batch on its device, as the loop and the objectives read it."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor  # labels shifted: targets[i] is the token logits[i] must predict (collate's labels are unshifted)
    examples: list | None = None  # what the batch was made of (a teacher may look them up)
    position_ids: torch.Tensor | None = None  # packed examples: positions restart per document
    ahead: dict | None = None  # teacher name -> its targets for this batch, read ahead on the data thread


def to_batch(examples, pad_id, device) -> Batch:
    b = collate(examples, pad_id)
    pos = b.get("position_ids")
    return Batch(b["input_ids"].to(device), b["attention_mask"].to(device),
                 shift_labels(b["labels"]).to(device), list(examples), None if pos is None else pos.to(device))
