"""Generation tasks: what a model *says*, scored against reference answers.

- `rouge`: greedy answers to prompt/response or chat rows, ROUGE-L F1 (the `rouge-score` package,
  stemmed; the best over a row's references) against the reference answers, as MiniLLM and
  DistiLLM report on instruction sets; and the student's answers against the teacher's own
  (how well it imitates).
- `exact_match`: GSM8K-style rows (`answer` ending in `#### <number>`): the final number of the
  answer against the reference's, extracted the two ways lm-eval's gsm8k task does (strict: after
  `#### `; flexible: the last number in the answer), compared after dropping `,`, `$` and a final `.`.

A row's prompt is its conversation up to its last user turn, rendered with each model's own chat
template (generate.LocalTeacher), so models of different tokenizers answer the same prompts; the
reference is the assistant turn after it, plus any strings in a `references` list on the row.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from stillroom.errors import UserError

log = logging.getLogger("stillroom")

TASKS = ("rouge", "exact_match")


@dataclass
class Item:
    prompt: list[dict]                 # messages, ending with the user's turn
    references: list[str] = field(default_factory=list)
    line: int = 0                      # the row's line (or index) in its source


def read_items(path: str, task: str, limit: int | None = None, fields: dict | None = None,
               split: str = "train") -> list[Item]:
    """The task's rows from a JSONL file or a dataset: prompt and reference answers each."""
    from stillroom.data.rows import read_records, read_row, row_keys

    check_task(task)
    rows = read_records(path, split)
    if rows is None:
        raise UserError(f"the task {task} needs rows with reference answers (JSONL or a dataset folder), "
                        f"not plain text: {path}")
    items = []
    for n, row in rows:
        got = read_row(row, fields)
        if isinstance(got, str):
            raise UserError(f"{path} row {n}: {got}")
        msgs = got.messages or []
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        after = msgs[last_user + 1:] if last_user is not None else []
        refs = [m["content"] for m in after[:1] if m["role"] == "assistant" and m["content"].strip()]
        extra = row.get("references")
        if isinstance(extra, list):
            refs += [r for r in extra if isinstance(r, str) and r.strip()]
        if last_user is None or not refs:
            raise UserError(f"{path} row {n}: no reference answer (needs a prompt and its answer: "
                            f"{', '.join(row_keys(rows)[:6]) or 'no keys'} found) for the task {task}")
        if task == "exact_match" and final_number(refs[0], "strict") is None:
            raise UserError(f"{path} row {n}: the answer does not end in '#### <number>' (GSM8K format), "
                            "which the task exact_match scores against")
        items.append(Item(msgs[:last_user + 1], refs, n))
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError(f"{path} holds no rows")
    return items


def check_task(task: str):
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; the tasks are: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------- scorers

_scorer = None


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F1 of `prediction`, the best over `references` (rouge-score, Porter-stemmed)."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer
        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max(_scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def final_number(text: str, how: str = "strict") -> str | None:
    """The answer's final number as lm-eval's gsm8k extracts it: strict, the number after `#### `
    (the first such); flexible, the last number anywhere in the text. Normalized (no `,` or `$`,
    no final `.`), or None when there is none."""
    if how == "strict":
        m = STRICT.search(text)
        found = m.group(1) if m else None
    else:
        hits = [a or b for a, b in FLEXIBLE.findall(text)]
        found = hits[-1] if hits else None
    if found is None:
        return None
    found = found.replace(",", "").replace("$", "").strip()
    found = found[:-1] if found.endswith(".") else found
    return found or None


def exact_match(prediction: str, reference: str) -> dict:
    want = final_number(reference, "strict")
    return {how: final_number(prediction, how) == want for how in ("strict", "flexible")}


# ---------------------------------------------------------------------------------- running

def answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
            progress: bool = True, desc: str = "answering") -> list[str]:
    """Greedy answers, batched (left-padded) through the model's chat template."""
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from stillroom.run.feedback import progress_on
    from stillroom.teachers.generate import LocalTeacher

    who = LocalTeacher(model, tokenizer, desc)
    gcfg = SimpleNamespace(temperature=0.0, max_new_tokens=max_new_tokens, num_answers=1, seed=0,
                           top_p=1.0, top_k=0)
    out, was = [], model.training
    model.eval()
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not (progress and progress_on())) as bar:
        for i in range(0, len(prompts), batch_size):
            for a in who.answer(prompts[i:i + batch_size], gcfg, 0):
                out.append(a[0]["content"] if isinstance(a[0], dict) else a[0])
            bar.update(min(batch_size, len(prompts) - i))
    model.train(was)
    return out


def answer_all(items: list[Item], models: dict, max_new_tokens: int = 128, batch_size: int = 8,
               progress: bool = True, what: str = "") -> dict:
    """models: {name: (model, tokenizer)} -> {name: [greedy answer per item]}."""
    return {name: answers(m, tok, [it.prompt for it in items], max_new_tokens, batch_size, progress,
                          f"{what}{name}") for name, (m, tok) in models.items()}


def score(task: str, items: list[Item], said: dict) -> tuple[dict, list[dict]]:
    """said: {name: [answer per item]} ("teacher" among them for the imitation score) ->
    ({name: {metric: mean}}, one record per row: prompt, references, each model's answer and scores)."""
    records = []
    for i, it in enumerate(items):
        rec = {"line": it.line, "prompt": it.prompt[-1]["content"], "references": it.references}
        for name in said:
            a = said[name][i]
            rec[name] = {"answer": a}
            if task == "rouge":
                rec[name]["rougeL"] = rouge_l(a, it.references)
                if name != "teacher" and "teacher" in said:
                    rec[name]["rougeL_vs_teacher"] = rouge_l(a, [said["teacher"][i]]) if said["teacher"][i] else 0.0
            else:
                hit = exact_match(a, it.references[0])
                rec[name].update({"exact_match_strict": float(hit["strict"]),
                                  "exact_match_flexible": float(hit["flexible"])})
        records.append(rec)
    scores = {}
    for name in said:
        keys = [k for k in records[0][name] if k != "answer"]
        scores[name] = {k: sum(r[name][k] for r in records) / len(records) for k in keys}
    return scores, records


def result(task: str, items: list[Item], said: dict, max_new_tokens: int, path: Path | None,
           named: str | None = None) -> dict:
    """The task's entry in a result: `said` scored, each row written to `path` (when there is one),
    which the entry names as `named` (default the path itself)."""
    scores, records = score(task, items, said)
    if path is not None:
        write_records(path, records)
    return {"scores": scores, "rows": len(records), "max_new_tokens": max_new_tokens,
            "answers": named or (str(path) if path is not None else None)}


def write_records(path: Path, records: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


LABELS = {"rougeL": "ROUGE-L F1 vs references", "rougeL_vs_teacher": "ROUGE-L F1 vs the teacher's answers",
          "exact_match_strict": "exact match (strict, '#### n')", "exact_match_flexible": "exact match (flexible, last number)"}


def tables(found: dict) -> str:
    """A run's task results (its metrics' "tasks") as text after its evaluation table."""
    return "".join(f"\n\ntask {t} ({got['answers']}):\n" + table(got["scores"], got["rows"]) for t, got in found.items())


def table(scores: dict, rows: int) -> str:
    """The task scores side by side, one column per model."""
    names = list(scores)
    keys = [k for k in LABELS if any(k in scores[n] for n in names)]
    width = max(len(LABELS[k]) for k in keys)
    w = {n: max(10, len(n)) for n in names}
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>{w[n]}}" for n in names)]
    for k in keys:
        cells = [f"{scores[n][k]:>{w[n]}.4f}" if k in scores[n] else f"{'-':>{w[n]}}" for n in names]
        lines.append(f"{LABELS[k]:<{width}}  " + "  ".join(cells))
    lines.append(f"({rows} rows, greedy answers)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- in a run

def from_config(cfg) -> dict[str, list[Item]]:
    """eval.tasks' rows (read, and refused, before a run writes anything): {task: items}."""
    e = cfg.eval
    if not e.tasks:
        return {}
    path = e.task_data or cfg.data.eval_path
    if not path:
        raise UserError("eval.tasks needs rows with reference answers that the student does not train on: "
                        "set eval.task_data (or data.eval_path)")
    if not Path(path).exists() and Path(path).suffix:
        raise UserError(f"eval.task_data {path}: file not found")
    fields = cfg.data.fields if not e.task_data else None   # data.eval_path is in the training data's format
    return {t: read_items(path, t, e.task_rows, fields) for t in dict.fromkeys(e.tasks)}


def in_run(items: dict, said: dict, trained: dict, ecfg, out: Path, progress: bool = True) -> dict:
    """After training: the trained models' answers (trained: {name: (model, tokenizer)}) joined to
    `said` ({task: {name: answers}}, the teacher's and the untrained ones'), scored, each row
    written to <out>/tasks-<task>.jsonl."""
    found = {}
    for task, its in items.items():
        said[task].update(answer_all(its, trained, ecfg.max_new_tokens, ecfg.batch_size, progress, f"{task}: "))
        name = f"tasks-{task}.jsonl"   # the report reads it beside the run's other files
        found[task] = result(task, its, said[task], ecfg.max_new_tokens, out / name, name)
    return found
