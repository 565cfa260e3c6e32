"""One run's lifecycle, each step written once, for every command that trains: distill, codistill,
the fine-tune stage and the library's Distiller (torchtune's recipes run setup() once and
train() once; here the steps are the session's methods, called in this order):

    with Session(cfg, overwrite=..., resume=...) as s:   # the output folder checked and locked,
                                                          # the accelerator made, the seed set
        teacher = s.place(model)                          # every model on its device before it runs
        cfg, train, held = s.data(teacher, tokenizer)     # the data (generated where the teacher runs)
        s.begin(cfg)                                      # validated: the resume check, the folder,
                                                          # config.yaml
        said = s.tasks_before(items, models)              # eval.tasks' answers before training
        last_log = s.fit(run)                             # the loop (run/loop.py)
        s.finish(metrics, table)                          # the tasks after, final/'s table, the report

Devices are decided here and nowhere else: `place` puts a model on the run's device (an
offloaded teacher's decoder layers in host memory, each brought to the device for its own
forward), and the evaluation and the teachers move their inputs to the model that reads them, so
a teacher and a student on different devices never meet.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("stillroom")


class Session:
    """cfg: the run's config (Config or CodistillRunConfig); inputs: the local paths the run reads
    (an --overwrite may not delete them; default: the config's). threads=False leaves the
    process's thread count and allocator alone (a library caller's)."""

    def __init__(self, cfg, *, overwrite: bool = False, resume: bool = False, progress: bool = True,
                 signals: bool = True, threads: bool = True, inputs=None):
        from stillroom.run.outputs import inputs_of

        self.cfg, self.out = cfg, Path(cfg.train.output_dir)
        self.overwrite, self.resume, self.progress, self.signals = overwrite, resume, progress, signals
        self.threads = threads
        self.inputs = inputs_of(cfg) if inputs is None else inputs
        self.kind = "codistill run" if hasattr(cfg, "peers") else "run"   # the folder's marker: which command made it
        self._stack = contextlib.ExitStack()
        self._damaged: list = []   # --resume: checkpoints newer than the newest intact one
        self.last_log: dict = {}   # the loop's last log record

    # -------------------------------------------------------------------------------- setup

    def __enter__(self) -> "Session":
        from stillroom.run.feedback import progress
        from stillroom.run.outputs import own_output
        from stillroom.run.tracking import make_accelerator

        self._stack.enter_context(progress(self.progress))
        self._stack.enter_context(own_output(self.out, self.overwrite, self.resume, self.inputs, self.kind))
        if self.cfg.train.deterministic:
            self._stack.enter_context(deterministic())
        try:
            self.accelerator = make_accelerator(self.cfg, self.out, threads=self.threads)
        except BaseException:   # the claim sees the failure (a folder it made for nothing is removed)
            if not self._stack.__exit__(*sys.exc_info()):
                raise
        torch.manual_seed(self.cfg.train.seed)
        if self.resume and self.main:   # verified before any model loads; set aside once the run is validated
            from stillroom.run.outputs import damaged_checkpoints
            try:
                self._damaged = damaged_checkpoints(self.out)
            except BaseException:
                if not self._stack.__exit__(*sys.exc_info()):
                    raise
        return self

    def __exit__(self, et, e, tb):
        quiet = self._stack.__exit__(et, e, tb)
        if self.signals and et is not None and issubclass(et, KeyboardInterrupt) and not quiet:
            raise interrupted(self.out, et) from None
        return quiet

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def place(self, model: torch.nn.Module, *, offload: bool = False, dtype=None) -> torch.nn.Module:
        """The model on the run's device (models/offload.py's place: its parameters in `dtype` when
        given; offload: a teacher's decoder layers in host memory, each brought to the device for
        its own forward). Every model the run holds passes here before anything runs on it."""
        from stillroom.models.offload import place

        return place(model, self.device, offload, dtype)

    def data(self, teacher, tokenizer=None, rows=None, eval_rows=None):
        """-> (cfg with data.path resolved, train examples, held-out examples): see run/distill.py's
        prepare_data. teacher: the loaded teacher (models.Loaded), already placed (the default
        data is its generated answers)."""
        from stillroom.run.distill import prepare_data

        cfg, train, held = prepare_data(self.cfg, teacher, self.accelerator, tokenizer, rows, eval_rows)
        self.cfg = cfg
        return cfg, train, held

    def begin(self, cfg=None):
        """Everything is validated: from here on the output folder is written. The resume check
        runs on every process (a refusal stops them all); the main process empties or marks the
        folder and writes config.yaml."""
        from stillroom.recipes import to_yaml
        from stillroom.run import folders
        from stillroom.run.outputs import (check_same_data, data_fingerprints, record_resume, resume_changes,
                                           set_aside, start_output)

        self.cfg = cfg or self.cfg
        changes = resume_changes(self.out, self.cfg) if self.resume else {}
        data = data_fingerprints(self.cfg) if self.main or self.resume else {}   # written by the main one
        if self.resume:
            check_same_data(self.out, data)
        if self.main:
            set_aside(self._damaged)
            start_output(self.out, self.overwrite, self.resume, self.kind)
            record_resume(self.out, changes)
            (self.out / "config.yaml").write_text(to_yaml(self.cfg))
            if not (self.resume and (self.out / "inputs.json").exists()):
                folders.write_json(self.out / "inputs.json", data, indent=1)
        if self.resume and self.world > 1:   # every process loads the checkpoint the main one kept
            self.accelerator.wait_for_everyone()
        from stillroom.run import faults
        faults.point("session.begun")   # the folder written, no step taken

    # -------------------------------------------------------------------------------- around training

    def tasks_before(self, items: dict, models: dict) -> dict:
        """eval.tasks: the answers of the models before training ({name: (model, tokenizer)}), on
        the main process; {} without tasks."""
        from stillroom.eval import tasks

        if not (self.main and items):
            return {}
        e = self.cfg.eval
        return {t: tasks.answer_all(its, models, e.max_new_tokens, e.batch_size, self.progress, f"{t}: ")
                for t, its in items.items()}

    def fit(self, cfg, trainees: list, objective, batches, evaluate=None, desc: str = "distill") -> dict:
        """The loop (run/loop.py's fit) from the start, or from the last checkpoint on --resume."""
        from stillroom.run import loop

        self.last_log = loop.fit(trainees, objective, batches, cfg=cfg, accelerator=self.accelerator, out=self.out,
                                 resume=self.resume, evaluate=evaluate, desc=desc, progress=self.progress,
                                 signals=self.signals)
        return self.last_log

    def finish(self, metrics: dict, table: str, items: dict, said: dict, trained: dict, write, note: str = "") -> dict:
        """After training, on the main process: the tasks' answers of the trained models (beside
        `said`, the ones before), final/ written by `write(metrics)` (-> its path), the table (and
        a `note` under it), the report. -> metrics with "table", "final" and "report"."""
        from stillroom.eval import tasks
        from stillroom.eval.report import write as write_report

        if items:
            metrics["tasks"] = tasks.in_run(items, said, trained, self.cfg.eval, self.out, self.progress)
        final = write(metrics)
        metrics["table"] = table + tasks.tables(metrics.get("tasks", {})) + note
        metrics["final"] = str(final)
        report = write_report(self.out, strict=False)
        if report is not None:
            metrics["report"] = str(report)
        return metrics


def interrupted(out: Path, et):
    """Ctrl-C or SIGTERM outside the loop's step boundary (loading, data, the evaluations, a second
    Ctrl-C): a Stopped that says what to run next, which depends on what the run has written."""
    from stillroom.errors import Stopped, Terminated
    from stillroom.run import folders
    from stillroom.run.outputs import checkpoints

    name, code = ("SIGTERM", 143) if issubclass(et, Terminated) else ("Ctrl-C", 130)
    have = checkpoints(out) if out.is_dir() else []
    if have:
        return Stopped(f"stopped by {name}: continue from {have[-1].name} with --resume", code)
    if folders.entries(out):
        return Stopped(f"stopped by {name} before the first checkpoint, so there is nothing to resume: run the "
                       "same command with --overwrite to start again", code)
    return Stopped(f"stopped by {name} before the run began: run the same command again", code)


@contextlib.contextmanager
def deterministic():
    """train.deterministic for the run's life, the process's own settings restored after it."""
    import os

    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before the first cuBLAS call
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.benchmark = was[1]
