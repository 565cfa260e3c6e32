"""Reading data: the sources (text and JSONL files, dataset folders, the hub) and the row formats
stillroom reads, one table for every command (distill, cache, eval, generate).

A JSONL line or dataset row becomes plain text, a prompt/response pair, or a conversation:

| the row has                                  | prompt                          | response      |
|----------------------------------------------|---------------------------------|---------------|
| `text`                                       | (plain text: every token learnt)|               |
| `prompt` + `response` (or `completion`)      | prompt                          | response      |
| `instruction` [+ `input`] + `output` (Alpaca)| instruction, blank line, input  | output        |
| `question` + `answer` (GSM8K)                | question                        | answer        |
| `messages`: [{role, content}] (OpenAI)       | the turns before each assistant | assistant turns |
| `conversations`: [{from, value}] (ShareGPT)  | human/user turns (system kept)  | gpt/assistant turns |
| `turns`: [str, ...] (MT-Bench)               | user turns, answered in order   | (none: prompts for `generate`) |

Anything else: name the fields with `data.fields={prompt: KEY, response: KEY}` (a `text` or
`messages` key can be named the same way), or `--prompt-field` / `--response-field`. The first
format that matches, in the order above, is used; `fields` overrides them all.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from stillroom.errors import UserError

log = logging.getLogger("stillroom")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
PAIRS = (("prompt", "response"), ("prompt", "completion"), ("question", "answer"))
KNOWN = "text, prompt+response, instruction+output, question+answer, messages, conversations or turns"


@dataclass
class Row:
    """One row, read: `text` (plain text), or `messages` (a conversation; `pair` when it is one
    user prompt and one answer, which a tokenizer without a chat template renders as plain
    `prompt\\nresponse`)."""
    text: str | None = None
    messages: list[dict] | None = None
    pair: bool = False


def read_row(row: dict, fields: dict | None = None) -> Row | str:
    """A row -> Row, or a string saying why it cannot be read."""
    fields = {k: v for k, v in (fields or {}).items() if v}
    if fields:
        return _mapped(row, fields)
    if isinstance(row.get("messages"), list):
        return _messages(row["messages"])
    if isinstance(row.get("conversations"), list):
        return _sharegpt(row["conversations"])
    if isinstance(row.get("turns"), list):
        return _turns(row["turns"])
    for p, r in PAIRS:
        if isinstance(row.get(p), str) and _text(row.get(r)) is not None:
            return _pair(row[p], _text(row[r]))
    if isinstance(row.get("instruction"), str) and _text(row.get("output")) is not None:
        return _pair(alpaca_prompt(row), _text(row["output"]))
    if isinstance(row.get("text"), str):
        return Row(text=row["text"])
    for key in ("prompt", "instruction", "question"):   # a prompt with no answer: for generate
        if isinstance(row.get(key), str):
            return _prompt_only(alpaca_prompt(row) if key == "instruction" else row[key])
    return f"needs {KNOWN} (or set data.fields)"


def _text(value) -> str | None:
    """A field's text: a string; a number (an answer of 42) as it is written; OpenAI's content
    parts ([{type: text, text}, ...]) joined. None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(x, dict) and x.get("type") == "text"
                                                 and isinstance(x.get("text"), str) for x in value):
        return "".join(x["text"] for x in value)
    return None


def alpaca_prompt(row: dict) -> str:
    extra = row.get("input")
    return f"{row['instruction']}\n\n{extra}" if isinstance(extra, str) and extra.strip() else row["instruction"]


def _pair(prompt: str, response: str) -> Row:
    return Row(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], pair=True)


def _prompt_only(prompt: str) -> Row:
    return Row(messages=[{"role": "user", "content": prompt}], pair=True)


def _mapped(row: dict, fields: dict) -> Row | str:
    def get(name):
        key = fields[name]
        return row.get(key), key

    if "messages" in fields:
        v, key = get("messages")
        if not isinstance(v, list):
            return f"no list '{key}'"
        return _messages(v) if all(isinstance(m, dict) and "role" in m for m in v) else _sharegpt(v)
    if "text" in fields:
        v, key = get("text")
        return Row(text=v) if isinstance(v, str) else f"no string '{key}'"
    if "prompt" not in fields:
        return "data.fields needs a prompt (and response), text or messages key"
    p, pkey = get("prompt")
    if isinstance(p, list) and all(isinstance(x, str) for x in p):
        got = _turns(p)
    elif isinstance(p, str) and p.strip():
        got = _prompt_only(p)
    else:
        return f"no non-empty string '{pkey}'"
    if "response" not in fields:
        return got
    r, rkey = get("response")
    if _text(r) is None:
        return f"no string '{rkey}'"
    if isinstance(p, list):
        return "a list of prompt turns takes no response field"
    return _pair(p, _text(r))


def _messages(msgs: list) -> Row | str:
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and _text(m.get("content")) is not None):
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                kinds = sorted({str(x.get("type")) for x in m["content"] if isinstance(x, dict)} - {"text"})
                return f"message content parts of type {', '.join(kinds) or '?'}: only text parts are read"
            return "each message needs string 'role' and 'content'"
    return Row(messages=[{"role": m["role"], "content": _text(m["content"])} for m in msgs])


def _sharegpt(turns: list) -> Row | str:
    msgs = []
    for t in turns:
        if not (isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)):
            return "each conversations entry needs string 'from' and 'value'"
        role = SHAREGPT_ROLES.get(t["from"].lower())
        if role is None:
            return f"conversations: unknown speaker {t['from']!r} (known: {', '.join(SHAREGPT_ROLES)})"
        msgs.append({"role": role, "content": t["value"]})
    return Row(messages=msgs)


def _turns(turns: list) -> Row | str:
    if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        return "turns must be a list of non-empty strings"
    return Row(messages=[{"role": "user", "content": t} for t in turns])


def row_keys(rows) -> list[str]:
    """The keys the rows have (for an error when no row could be read)."""
    seen = {}
    for _, row in rows:
        for k in row:
            seen[k] = seen.get(k, 0) + 1
    return sorted(seen, key=lambda k: -seen[k])


# ---------------------------------------------------------------------------------- sources

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
            broken = isinstance(row, dict) and broken_unicode(row)
        except json.JSONDecodeError as e:
            yield n, f"invalid JSON: {e.msg}"
            continue
        except RecursionError:
            yield n, "JSON nested too deep to read"
            continue
        if not isinstance(row, dict):
            yield n, "not a JSON object"
        elif broken:
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


def read_records(path, split: str = "train"):
    """[(line or row number, row)] of a JSONL file (refusing its first unreadable line) or of a
    dataset (a folder or a hub id); None for any other file (plain text, which each caller reads
    its own way)."""
    p = Path(path)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        rows, bad = read_jsonl(p)
        if bad:
            n, why = bad[0]
            raise UserError(f"{path} line {n}: {why}")
        return rows
    if p.is_file():
        return None
    return read_hf(str(path), split)


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
        with open(p, "rb") as f:
            head = f.read(6)
        for magic, what, undo in ((b"\x1f\x8b", "gzip", "gunzip"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
                                  (b"PK\x03\x04", "zip", "unzip"), (b"BZh", "bzip2", "bunzip2"),
                                  (b"\xfd7zXZ", "xz", "unxz")):
            if head.startswith(magic):
                raise UserError(f"data file {path} is {what}-compressed: decompress it first ({undo} {path})")


TEXT_PIECE = 16 << 20   # a plain text file bigger than 4 pieces is tokenized piece by piece


def text_ids(path: str, tokenizer) -> list[int]:
    """A plain text file -> its tokens, as one document. Up to 4 pieces' size it is tokenized
    whole; beyond, piece by piece at line ends (tokens can differ from tokenizing it whole only
    where two pieces meet: a token or two in 16 MB), so it never has to fit in memory as one
    string. A byte-order mark is not text."""
    size = Path(path).stat().st_size
    if size > 1 << 20:
        log.info("tokenizing %s (%.1f MB of text)", path, size / 2**20)
    ids: list[int] = []
    text = False
    with open(path, encoding="utf-8-sig") as f:
        try:
            while True:
                piece = f.read() if size <= 4 * TEXT_PIECE else f.read(TEXT_PIECE)
                if not piece:
                    break
                piece += f.readline()
                text = text or bool(piece.strip())
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        except UnicodeDecodeError:
            raise UserError(f"data file {path} is not UTF-8 text") from None
    if not text or not ids:
        raise UserError(f"data file {path} has no text")
    return ids
