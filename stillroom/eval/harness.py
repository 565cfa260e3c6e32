"""EleutherAI's lm-evaluation-harness (`lm-eval`, the extra `stillroom[lm-eval]`) on the teacher
and the student, side by side: `stillroom eval --lm-eval TASKS [--include-path DIR]`.

The models go in as they are loaded (the harness's Hugging Face backend, `HFLM`, given the model
objects), so a GGUF teacher or a run folder works as anywhere else in stillroom. stillroom ships
one small local task, `stillroom_facts` (multiple choice, scored by log-likelihood), that runs
offline; the standard tasks (hellaswag, arc_easy, gsm8k, ...) download their datasets from the
Hugging Face hub, so they need a machine with network access (or the datasets in its cache).
"""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from stillroom.errors import UserError

log = logging.getLogger("stillroom")

ASSETS = Path(__file__).parents[1] / "assets" / "lm_eval"   # stillroom/assets/lm_eval
LOCAL_TASKS = {p.stem: p for p in ASSETS.glob("*.yaml")}


def _require():
    try:
        import lm_eval   # noqa: F401
    except ImportError:
        raise UserError("--lm-eval needs EleutherAI's harness: pip install 'stillroom[lm-eval]'") from None


def _local(name: str) -> dict:
    """A shipped task as the config dict the harness takes, its data file made absolute."""
    cfg = yaml.safe_load(LOCAL_TASKS[name].read_text())
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {k: str(ASSETS / v) for k, v in files.items()}
    return cfg


def task_dict(names: list[str], include_path: str | None = None) -> dict:
    """The tasks, loaded (their datasets read): a name the harness does not know, or a task whose
    data cannot be had (offline), is one line saying so."""
    _require()
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path}: not a folder")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    wanted = []
    for name in names:
        if name in LOCAL_TASKS and not (include_path and name in manager.all_tasks):
            wanted.append(_local(name))
        elif name in manager.all_tasks:
            wanted.append(name)
        else:
            raise UserError(f"unknown lm-eval task {name!r}: stillroom ships {', '.join(sorted(LOCAL_TASKS))}; "
                            "the harness's own are listed by `lm-eval ls tasks`; a task of yours needs "
                            "--include-path DIR (its YAML's folder)")
    try:
        return manager.load(wanted)
    except UserError:
        raise
    except Exception as e:   # the hub offline, a missing file, a task that needs a package
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"lm-eval could not load the tasks {', '.join(names)} ({type(e).__name__}: {first}); "
                        "a standard task downloads its dataset from the Hugging Face hub and needs network "
                        "access (or the dataset in the local cache)") from None


def run(tasks: dict, models: dict, batch_size: int = 8, limit: int | None = None, progress: bool = True) -> dict:
    """tasks: task_dict's; models: {name: (model, tokenizer)} -> {name: {task: {metric: value}}}
    (the harness's metrics, `acc`, `acc_norm`, ... and their standard errors as `acc_stderr`).
    progress=False: the harness's own progress bars (it has no switch for them) are not shown."""
    if not progress:
        import contextlib
        import os
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
            return run(tasks, models, batch_size, limit)
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)   # its notes on being handed a model object
    found = {}
    for name, (model, tok) in models.items():
        was = model.training
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(next(model.parameters()).device))
        res = evaluator.evaluate(lm=lm, task_dict=tasks, limit=limit, verbosity="WARNING")
        model.train(was)
        found[name] = {task: {k.split(",")[0]: v for k, v in metrics.items()
                              if k not in ("alias", "sample_len") and isinstance(v, (int, float))}
                       for task, metrics in res["results"].items()}
    return found


def table(scores: dict) -> str:
    names = list(scores)
    rows = [(task, metric) for task, metrics in scores[names[0]].items() for metric in metrics
            if not metric.endswith("_stderr")]
    width = max(len(f"{t} {m}") for t, m in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>16}" for n in names)]
    for t, m in rows:
        cells = []
        for n in names:
            v, se = scores[n][t].get(m), scores[n][t].get(f"{m}_stderr")
            cells.append(f"{v:.4f} ± {se:.4f}" if isinstance(se, float) else f"{v:.4f}")
        lines.append(f"{t + ' ' + m:<{width}}  " + "  ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)
