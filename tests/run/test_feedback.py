"""What a person sees: every long phase says what it does, --no-progress still reports training,
checkpoints print no false alarm, every flag is explained, export writes where the README says,
and the report counts and plots what the table shows."""
import argparse
import json
import re
import shutil

import pytest

from stillroom import cli

from conftest import run_cli, tiny_overrides


def test_distill_says_what_each_phase_does_and_logs_steps_without_a_bar(tmp_path, teacher_dir, chat_file):
    r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "r"), "train.max_steps=4",
                "train.save_every=2", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    err = r.stderr
    order = ["evaluating the teacher and the untrained student", "distill step 1/4: loss",
             "distill step 4/4: loss", "evaluating the trained student; then writing"]
    at = [err.find(x) for x in order]
    assert all(a >= 0 for a in at) and at == sorted(at), err[-3000:]
    assert re.search(r"distill step 2/4: loss \d+\.\d+, \d+ tokens/s, \d+ s elapsed, ~\d+ s left", err)
    # item 8: checkpoints of a model with a tied output head print no "Removed shared tensor" alarm
    assert "Removed shared tensor" not in err


def test_a_phase_says_what_it_does_only_once_it_is_slow(caplog):
    import time

    from stillroom.run.feedback import phase
    with caplog.at_level("INFO", logger="stillroom"):
        with phase("quick work", after=0.5):
            pass
        with phase("slow work", after=0.1):
            time.sleep(0.4)
    said = [r.getMessage() for r in caplog.records]
    assert not any("quick work" in m for m in said)
    assert "slow work ..." in said and any(m.startswith("slow work: done in") for m in said)


def test_a_library_run_with_progress_false_shows_no_bar(tmp_path, teacher_dir, chat_file, monkeypatch):
    """distill(progress=False) turns every bar off for the run (the held-out evaluation's too)
    and leaves the switch as it was."""
    from stillroom.recipes import load_config
    from stillroom.eval import evaluate
    from stillroom.run import feedback
    from stillroom.run.distill import distill

    monkeypatch.setattr(feedback, "_progress", True)   # bars on, whatever an earlier test left
    shown = []
    real = feedback.bar
    monkeypatch.setattr(evaluate, "bar", lambda *a, **k: (shown.append(feedback.progress_on()), real(*a, **k))[1])
    distill(load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "r") + ["train.max_steps=1"]),
            progress=False)
    assert shown and not any(shown)
    assert feedback.progress_on()


def test_eval_names_the_models_it_compares(tmp_path, teacher_dir, chat_file):
    r = run_cli("eval", "--model", teacher_dir, "--teacher", teacher_dir, "--data", chat_file, "--seq-len", "64")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"student {teacher_dir} vs teacher {teacher_dir}, on {chat_file}")
    assert "perplexity" in r.stdout


def test_eval_defaults_to_the_teacher_the_student_was_distilled_from(tmp_path, teacher_dir, chat_file):
    out = tmp_path / "r"
    assert run_cli("distill", *tiny_overrides(teacher_dir, chat_file, out), "--no-progress").returncode == 0
    r = run_cli("eval", "--model", out, "--data", chat_file, "--seq-len", "64", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["teacher"] == str(teacher_dir)


def _actions(p: argparse.ArgumentParser, prefix=""):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, f"{prefix}{name} ")
        elif not isinstance(a, argparse._HelpAction):
            yield prefix, a


def test_every_flag_has_help_text():
    missing = [f"{where}{'/'.join(a.option_strings) or a.dest}" for where, a in _actions(cli.parser())
               if not a.help]
    assert not missing, missing


def test_export_writes_beside_the_folder_it_is_given(tmp_path, teacher_dir):
    run = tmp_path / "runs" / "demo"
    shutil.copytree(teacher_dir, run / "final")
    assert cli.main(["export", str(run), "--type", "f16", "--no-check"]) == 0
    assert (tmp_path / "runs" / "demo-f16.gguf").is_file()           # README: runs/demo -> runs/demo-q8_0.gguf
    assert cli.main(["export", str(run / "final"), "--type", "f16", "--no-check"]) == 0
    assert (run / "demo-f16.gguf").is_file()                          # runs/demo/final -> runs/demo/demo-f16.gguf
    model = tmp_path / "models" / "mine"
    shutil.copytree(teacher_dir, model)
    assert cli.main(["export", str(model), "--type", "f16", "--no-check"]) == 0
    assert (tmp_path / "models" / "mine-f16.gguf").is_file()


def test_training_time_counts_across_resumes_and_short_runs_log_every_step(tmp_path, teacher_dir, chat_file):
    import time

    from stillroom.run import loop
    out = tmp_path / "r"
    base = [*tiny_overrides(teacher_dir, chat_file, out), "train.log_every=10", "train.save_every=2"]
    real = loop.accumulate

    def slow(*a, **k):   # every step takes at least 0.3 s, so elapsed time is visible
        time.sleep(0.3)
        return real(*a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "accumulate", slow)
    try:
        assert cli.main(["distill", *base, "train.max_steps=4", "--no-progress"]) == 0
        assert cli.main(["distill", *base, "train.max_steps=8", "--resume", "--no-progress"]) == 0
    finally:
        mp.undo()
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [s["step"] for s in steps] == list(range(1, 9))   # log_every=10, but a run under 50 steps logs each
    assert steps[-1]["elapsed_s"] >= 8 * 0.3 and steps[4]["elapsed_s"] > steps[3]["elapsed_s"]


def test_the_report_plots_agreement_in_percent_like_the_table(tmp_path, teacher_dir, chat_file):
    from stillroom.eval.report import plots, read_run
    out = tmp_path / "r"
    assert run_cli("distill", *tiny_overrides(teacher_dir, chat_file, out), "train.max_steps=4",
                   "train.eval_every=2", "--no-progress").returncode == 0
    svg = dict(plots(read_run(out)))["eval"]
    assert "top-1 agreement w/ teacher (%)" in svg
