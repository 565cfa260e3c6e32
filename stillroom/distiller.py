"""stillroom as a library: distill in-memory models on in-memory data.

    from stillroom import Distiller
    d = Distiller(teacher, student, tokenizer, ["some text", {"prompt": "Hi", "response": "Hello!"}],
                  loss={"alpha": 0.5, "temperature": 2.0}, train={"max_steps": 100})
    metrics = d.train()          # the evaluation table's numbers; d.student is the trained student

The same run as `stillroom distill` (one loop, the same objectives, checks and evaluation): the
CLI loads models and data from the config's paths and calls the same code. As a library it raises
ordinary exceptions (`stillroom.UserError` is a ValueError) instead of exiting, installs no signal
handlers, leaves the process's thread count alone and restores the caller's random state.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from stillroom.config import Config
from stillroom.recipes import validate
from stillroom.errors import UserError
from stillroom.models import core as models


from stillroom.models import running
class Distiller:
    """teacher, student: causal LMs (transformers models); tokenizer: the teacher's (and the
    student's, unless `student_tokenizer` is given: then set loss.cross_tokenizer=uld).
    train_data / eval_data: lists of texts or of row dicts (`text`, `prompt` + `response`,
    `messages`), or `datasets.Dataset`s; without eval_data a held-out fraction (data.eval_fraction)
    is split off. Keyword sections (`loss`, `train`, `data`, `eval`, `teacher`) are the config's,
    as dicts; output_dir: where checkpoints, the log and final/ go (default: a new temporary folder)."""

    def __init__(self, teacher, student, tokenizer, train_data, eval_data=None, *, student_tokenizer=None,
                 output_dir: str | Path | None = None, overwrite: bool = False, **sections):
        unknown = set(sections) - set(Config.model_fields) - {"student"}
        if unknown:
            raise UserError(f"unknown config section {sorted(unknown)[0]!r}: use {', '.join(Config.model_fields)}")
        raw = {k: dict(v) for k, v in sections.items()}
        raw.setdefault("teacher", {}).setdefault("model", "in-memory")
        raw.setdefault("train", {})["output_dir"] = str(output_dir or tempfile.mkdtemp(prefix="stillroom-"))
        self.cfg = validate(raw, Config)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.teacher = models.Loaded(models.freeze(teacher), tokenizer, "in-memory teacher", None)
        self.student = student
        self.student_tokenizer = student_tokenizer or tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.overwrite = overwrite
        self.metrics: dict | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    def train(self, resume: bool = False) -> dict:
        """Distill; -> the metrics (evaluation before and after, the last log record, final/'s
        path). The trained student replaces `self.student` (also saved in output_dir/final)."""
        from stillroom.run.distill import run_distill
        from stillroom.run.session import Session
        from stillroom.teachers.core import LiveTeacher

        cfg = self.cfg
        self.student.train()
        for p in self.student.parameters():
            p.requires_grad_(True)
        with torch.random.fork_rng(devices=[]), \
                Session(cfg, overwrite=self.overwrite, resume=resume, progress=False, signals=False,
                        threads=False, inputs=()) as s:
            tc = cfg.teacher
            s.place(self.teacher.model, offload=tc.offload, dtype=running.teacher_dtype(tc.dtype, s.device))
            teacher = LiveTeacher(self.teacher.model, tc.name, tc.weight, None, s.accelerator.autocast)
            self.metrics, self.student = run_distill(
                s, cfg, self.teacher, teacher, s.place(self.student), self.student_tokenizer, "in-memory student",
                rows=self.train_data, eval_rows=self.eval_data)
        return self.metrics


__all__ = ["Distiller"]
