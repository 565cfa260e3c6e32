"""The teacher as annotator: prompts in, JSONL conversations out (batched, resumable).

The output is chat data (`{"messages": [..., user, assistant]}` per line) that `stillroom distill`
trains on directly: soft labels when the teacher is also present at training time, or plain CE on
the teacher's text for sequence-level hard-label distillation (Kim & Rush 2016).

Prompts come from a .txt file (one per line), JSONL, or a Hugging Face dataset; each becomes a
conversation (an optional system message, then the prompt's turns) rendered with the teacher's
chat template. Repeated prompts are dropped, over-long ones skipped and reported, and each prompt
gets `num_answers` answers (sampled; repeated and empty answers dropped).

Resume: after every batch the rows are flushed and fsync'ed, then `<out>.progress.json` records
how many prompts are done, a hash of those prompts, a hash of the settings, and the file's length.
Running the same command again truncates anything past that length (a torn write) and continues;
a different prompt list or different settings are refused rather than mixed into one file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stillroom.errors import UserError
from stillroom.run import faults
from stillroom.run.folders import fsync_dir

log = logging.getLogger("stillroom")

BUNDLED_PROMPTS = Path(__file__).parents[1] / "assets" / "instructions.txt"   # stillroom/assets/


def _prompt_of(row: dict, field: str | None):
    """A row (any format of rows.py) -> the conversation to answer (messages ending with the
    user's turn; several user turns at its end are answered one after another), or an error."""
    from stillroom.data.rows import read_row

    got = read_row(row, {"prompt": field} if field else None)
    if isinstance(got, str):
        return got.replace("data.fields", "--prompt-field")
    if got.messages is None:
        return "no prompt (plain text): needs " + KNOWN_PROMPTS + " (or --prompt-field)"
    msgs = list(got.messages)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        return "messages do not end with a user turn"
    return msgs


KNOWN_PROMPTS = "prompt, instruction, question, messages, conversations or turns"


def split_turns(conv: list[dict]) -> tuple[list[dict], list[dict]]:
    """-> (the conversation up to its first trailing user turn, the user turns after it): MT-Bench's
    follow-up questions are asked after the teacher has answered the ones before."""
    i = len(conv)
    while i > 0 and conv[i - 1]["role"] == "user":
        i -= 1
    return conv[:i + 1], conv[i + 1:]


def read_prompts(path: str | Path | None, limit: int | None = None, field: str | None = None,
                 split: str = "train", system: str | None = None, dedup: bool = True) -> list[list[dict]]:
    """Prompts as conversations (lists of messages ending with a user turn)."""
    from stillroom.data.rows import read_records

    p = Path(path) if path else BUNDLED_PROMPTS
    if path and not p.exists() and p.suffix:
        raise UserError(f"prompts file not found: {p}")
    rows = read_records(path or p, split)
    if rows is None:   # plain text: one prompt per line
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"prompts file {p} is not UTF-8 text") from None
        rows = [(n, {"prompt": line.strip()}) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    prompts = []
    for n, row in rows:
        got = _prompt_of(row, field)
        if isinstance(got, str):
            raise UserError(f"{p} row {n}: {got}")
        prompts.append(got)
    if not prompts:
        raise UserError(f"prompts file {p} is empty")
    if dedup:
        seen, unique = set(), []
        for m in prompts:
            key = json.dumps([(x["role"], " ".join(x["content"].split())) for x in m])
            if key not in seen:
                seen.add(key)
                unique.append(m)
        if len(unique) < len(prompts):
            log.info("dropped %d repeated prompts of %d", len(prompts) - len(unique), len(prompts))
        prompts = unique
    if system:
        prompts = [[{"role": "system", "content": system}] + [m for m in c if m["role"] != "system"]
                   for c in prompts]
    return prompts[:limit] if limit else prompts


# ------------------------------------------------------------------------------------ answering

# For a base model (a tokenizer without a chat template): a plain question / answer layout that a
# pretrained LM continues (after its BOS token, which base models such as Gemma need); its
# answer is cut where it starts the next question.
PLAIN_TEMPLATE = ("{{ bos_token or '' }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
                  "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}\n"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")


class LocalTeacher:
    """A transformers model answering batches of conversations (left-padded, batched generate).
    A base model without a chat template is prompted as `Q: ...\nA:` (PLAIN_TEMPLATE)."""

    def __init__(self, model, tokenizer, source: str = ""):
        self.plain = not tokenizer.chat_template
        if self.plain:
            import copy
            log.info("%s has no chat template (a base model?): prompting it as 'Q: ... A:'", source or "the teacher")
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = PLAIN_TEMPLATE
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.context = getattr(model.config, "max_position_embeddings", None)   # prompt + answer must fit

    def prompt_tokens(self, conv) -> int:
        text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer(self, convs: list[list[dict]], gcfg, seed: int) -> list[list[str]]:
        tok = self.tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        sample = gcfg.temperature > 0
        torch.manual_seed(gcfg.seed + seed)
        kwargs = dict(do_sample=sample, max_new_tokens=gcfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                      num_return_sequences=gcfg.num_answers)
        if sample:
            kwargs.update(temperature=gcfg.temperature, top_p=gcfg.top_p, top_k=gcfg.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        flat = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        stops = self.model.generation_config.eos_token_id
        stops = set(stops if isinstance(stops, list) else [stops] if stops is not None else []) | {tok.eos_token_id}
        # an answer that never reached an end-of-turn token was cut by max_new_tokens
        cut = [not any(t in stops for t in row) for row in new.tolist()]   # one copy to the host, not one a token
        if self.plain:   # a base model goes on with the next question: keep its answer (not cut, then)
            cut = [c and "\nQ:" not in t for c, t in zip(cut, flat)]
            flat = [t.split("\nQ:")[0].strip() for t in flat]
        flat = [{"content": t, "truncated": True} if c else t for t, c in zip(flat, cut)]
        n = gcfg.num_answers
        return [flat[i * n:(i + 1) * n] for i in range(len(convs))]


# ------------------------------------------------------------------------------------ the file

def _sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _settings(gcfg, source: str) -> str:
    keys = ("max_new_tokens", "temperature", "top_p", "top_k", "num_answers", "seed", "dedup")
    return _sha({"teacher": source, **{k: getattr(gcfg, k) for k in keys}})


def _not_ours(out: Path, where: str) -> UserError:
    return UserError(f"{out} exists and is not an answers file of stillroom generate ({where}); it would be "
                     "replaced: choose another --out, or remove that file")


def _row_messages(line: str):
    """A generate row's conversation, or None for a line that is JSON of another kind; raises
    ValueError for a line that is not JSON at all."""
    try:
        row = json.loads(line)
    except RecursionError:
        return None
    messages = row.get("messages") if isinstance(row, dict) else None
    return messages if isinstance(messages, list) and messages else None


def _legacy_done(out: Path, prompts: list[list[dict]]) -> int:
    """A file written without a progress record (one answer per prompt): how many it answers. A
    file of any other rows is not ours and is refused, never cut: only a last line that is not
    JSON and has no newline (a write torn by a crash) is dropped."""
    lines = out.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    good = []
    for i, line in enumerate(lines):
        try:
            messages = _row_messages(line)
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break   # a torn last line
            raise _not_ours(out, f"line {i + 1} is not JSON") from None
        if messages is None:
            raise _not_ours(out, f"line {i + 1} is not a conversation it wrote")
        good.append(messages[:-1])
    if good != prompts[:len(good)]:
        raise UserError(f"{out} holds answers to other prompts; choose another output file or delete it")
    with open(out, "r+b") as f:  # drop a torn last line
        f.truncate(len("".join(lines[:len(good)]).encode("utf-8")))
    return len(good)


def _resume(out: Path, progress: Path, prompts, settings: str) -> int:
    if not out.exists():
        return 0
    if not progress.exists():
        return _legacy_done(out, prompts)
    with open(out, encoding="utf-8", errors="replace") as f:   # replaced by another file since?
        first = f.readline()
    try:
        ours = not first or _row_messages(first) is not None
    except ValueError:
        ours = False
    if not ours:
        raise _not_ours(out, "its first line is not a conversation it wrote")
    try:
        state = json.loads(progress.read_text())
        done = state["done"]
        assert isinstance(done, int) and isinstance(state["prefix"], str) and "settings" in state
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AssertionError):
        raise UserError(f"{progress} is damaged, so where {out} stopped is not known: remove both to generate "
                        "again, or choose another --out") from None
    if done > len(prompts) or _sha(prompts[:done]) != state["prefix"]:
        raise UserError(f"{out} holds answers to other prompts; choose another output file or delete it")
    if state["settings"] != settings:
        raise UserError(f"{out} was generated with other settings (teacher, sampling, num_answers, "
                        "max_new_tokens); choose another output file or delete it and its .progress.json")
    with open(out, "r+b") as f:  # whatever came after the last recorded batch is a torn write
        f.truncate(state["bytes"])
    return done


def _answer_rounds(teacher, keep, gcfg, seed: int, fits) -> tuple[list[tuple[list[dict], list]], int]:
    """Answer conversations (each (head, follow-up user turns), see split_turns) round by round:
    every round answers the heads still open; a head with follow-ups takes its answer and the next
    turn. A conversation ends at its last turn, at an empty or cut answer, or when the next turn
    would not fit. -> ((conversation before its last answer, that answer's candidates) each, the
    number of follow-up turns left unasked)."""
    done: list = [None] * len(keep)
    dropped = 0
    open_ = list(range(len(keep)))
    heads = [h for h, _ in keep]
    rests = [list(r) for _, r in keep]
    r = 0
    while open_:
        got = teacher.answer([heads[i] for i in open_], gcfg, seed=seed if r == 0 else seed * 1000 + r)
        still = []
        for i, answers in zip(open_, got):
            first = answers[0] if answers else ""
            text = first.get("content", "") if isinstance(first, dict) else first
            cut = isinstance(first, dict) and first.get("truncated")
            nxt = heads[i] + [{"role": "assistant", "content": text}] + rests[i][:1]
            if rests[i] and text.strip() and not cut and fits(nxt):
                heads[i], rests[i] = nxt, rests[i][1:]
                still.append(i)
            else:
                done[i] = (heads[i], answers)
                dropped += len(rests[i])
        open_, r = still, r + 1
    return done, dropped


COUNTS = ("skipped", "empty", "truncated", "dropped_turns")   # what generate_file counts (its result, the progress record)


def _answer_batch(teacher, batch, a: int, gcfg, fits) -> tuple[list[str], dict]:
    """One batch of conversations (starting at prompt `a`) -> its JSON lines and counts."""
    counts = dict.fromkeys(COUNTS, 0)
    keep = [split_turns(c) for c in batch]
    keep = [c for c in keep if fits(c[0])]
    counts["skipped"] += len(batch) - len(keep)
    lines = []
    answered, counts["dropped_turns"] = _answer_rounds(teacher, keep, gcfg, a, fits)
    for conv, answers in answered:
        seen = set()
        for r in answers:  # a string, or {"content": ..., "truncated"/"teacher_logprobs": ...}
            extra = dict(r) if isinstance(r, dict) else {}
            text = extra.pop("content", None) if extra else r
            key = re.sub(r"\s+", " ", text)
            if not text.strip():
                counts["empty"] += 1
                continue
            if gcfg.dedup and key in seen:
                continue
            seen.add(key)
            counts["truncated"] += bool(extra.get("truncated"))
            row = {"messages": conv + [{"role": "assistant", "content": text}], **extra}
            lines.append(json.dumps(row) + "\n")
    return lines, counts


def _record(f, out: Path, progress_file: Path, got, counts: dict, state):
    """Append a round's answers to the open `out` (unbuffered) and then its progress record, both
    on the disk before the next round. A failed write (a full disk) cuts `out` back to where the
    round began, so the file stays whole, and says so in one line; running again continues."""
    start = os.fstat(f.fileno()).st_size
    tmp = progress_file.with_name(progress_file.name + ".tmp")
    try:
        for _, lines, c in got:
            data = memoryview("".join(lines).encode("utf-8"))
            while data:
                data = data[f.write(data):]
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
        os.fsync(f.fileno())
        with open(tmp, "w") as p:
            p.write(json.dumps(state(os.fstat(f.fileno()).st_size)))
            p.flush()
            os.fsync(p.fileno())
        os.replace(tmp, progress_file)
        fsync_dir(progress_file.parent)
    except OSError as e:
        from stillroom.errors import write_failure

        why = write_failure(e, out.parent)
        os.ftruncate(f.fileno(), start)
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {out}: {why}; the answers written before are intact: free space and "
                        "run the same command again to continue") from None


def generate_file(teacher, prompts, out: Path, gcfg, progress: bool = True, state=None) -> dict:
    """Answer every prompt not yet answered in `out`, appending one JSON line per answer.
    `teacher`: a LocalTeacher or api.ApiTeacher; prompts are strings or conversations.
    A prompt that cannot fit (generate.max_prompt_tokens, or the teacher's context less
    max_new_tokens) is skipped before any compute; an answer cut by max_new_tokens is kept with
    `"truncated": true` (distill then learns no end-of-turn after it); empty answers are dropped.
    state: Accelerate's PartialState under a launch of several processes: batch j is answered by
    process j % N, and the main process writes each round of N batches in order, so the file is
    the one a single process writes (the same answers, greedy or seeded per batch).
    -> {"path", "rows", "prompts", "skipped", "empty", "truncated"} (counted over the whole file,
    earlier runs included)."""
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    main = rank == 0
    convs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    out = Path(out)
    progress_file = out.with_name(out.name + ".progress.json")
    settings = _settings(gcfg, teacher.source)
    counts = dict.fromkeys(COUNTS, 0)
    start = 0
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
        start = _resume(out, progress_file, convs, settings)
        if start and progress_file.exists():   # read by _resume: it parses
            counts.update(json.loads(progress_file.read_text()).get("counts", {}))
    if world > 1:   # where the file stands, as the main process read it
        from accelerate.utils import broadcast_object_list
        holder = [start]
        broadcast_object_list(holder)
        start = holder[0]
    context = getattr(teacher, "context", None)
    limit = gcfg.max_prompt_tokens
    if context:
        room = context - gcfg.max_new_tokens
        if room < 1:
            raise UserError(f"--max-new-tokens {gcfg.max_new_tokens} leaves no room for a prompt in the teacher's "
                            f"context of {context} tokens: lower --max-new-tokens")
        limit = min(limit or room, room)
    if gcfg.num_answers > 1 and any(split_turns(c)[1] for c in convs):
        raise UserError("prompts with several user turns (turns, or messages ending with more than one user "
                        "turn) get one answer per turn: use --num-answers 1")
    fits = (lambda c: teacher.prompt_tokens(c) <= limit) if limit else (lambda c: True)
    bar = tqdm(total=len(convs), initial=start, desc="teacher answers", unit="prompt",
               disable=not (progress and main))
    starts = list(range(start, len(convs), gcfg.batch_size))
    with open(out, "ab", buffering=0) if main else contextlib.nullcontext() as f:
        for r0 in range(0, len(starts), world):
            round_ = starts[r0:r0 + world]
            a = round_[rank] if rank < len(round_) else None
            got = [(a, *_answer_batch(teacher, convs[a:a + gcfg.batch_size], a, gcfg, fits))] if a is not None else []
            if world > 1:
                from accelerate.utils import gather_object
                got = sorted(gather_object(got), key=lambda x: x[0])
            if main:
                done = min(round_[-1] + gcfg.batch_size, len(convs))
                _record(f, out, progress_file, got, counts,
                        lambda size: {"settings": settings, "done": done, "prefix": _sha(convs[:done]), "bytes": size,
                                      "counts": counts})
            faults.point("generate.batch")   # a round of batches and its progress record are on the disk
            bar.update(min(len(convs), round_[-1] + gcfg.batch_size) - round_[0])
    bar.close()
    if not main:
        return {}
    rows = sum(1 for _ in open(out, encoding="utf-8"))
    if counts["skipped"]:
        why = f"longer than {limit} tokens" + (f" (the teacher's context {context} less --max-new-tokens "
                                               f"{gcfg.max_new_tokens})" if context and limit == context - gcfg.max_new_tokens
                                               else " (--max-prompt-tokens)")
        log.warning("skipped %d prompts %s", counts["skipped"], why)
    return {"path": out, "rows": rows, "prompts": len(convs), **counts}
