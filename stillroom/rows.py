"""The row formats stillroom reads, one table for every command (distill, cache, eval, generate).

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

from dataclasses import dataclass

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
        if isinstance(row.get(p), str) and isinstance(row.get(r), str):
            return _pair(row[p], row[r])
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        return _pair(alpaca_prompt(row), row["output"])
    if isinstance(row.get("text"), str):
        return Row(text=row["text"])
    for key in ("prompt", "instruction", "question"):   # a prompt with no answer: for generate
        if isinstance(row.get(key), str):
            return _prompt_only(alpaca_prompt(row) if key == "instruction" else row[key])
    return f"needs {KNOWN} (or set data.fields)"


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
    if not isinstance(r, str):
        return f"no string '{rkey}'"
    if isinstance(p, list):
        return "a list of prompt turns takes no response field"
    return _pair(p, r)


def _messages(msgs: list) -> Row | str:
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return "each message needs string 'role' and 'content'"
    return Row(messages=[{"role": m["role"], "content": m["content"]} for m in msgs])


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
