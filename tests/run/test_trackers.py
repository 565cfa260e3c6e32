"""Trackers users watch runs with (train.report_to): what stillroom logs reaches them, read back
with the tracker's own reader."""
import pytest

from conftest import assert_user_error, run_cli, tiny_overrides


def test_tensorboard_gets_the_loss_terms_lr_speed_and_every_evaluation(tmp_path, teacher_dir, chat_file):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, out), "train.max_steps=4", "train.eval_every=2",
                "train.report_to=[tensorboard]", "loss.terms={ce: 0.3, forward_kl: 0.5, reverse_kl: 0.2}", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((out / "stillroom").rglob("events.out.tfevents.*"))
    assert files, sorted(str(p) for p in out.rglob("*"))
    scalars = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in ("loss", "lr", "tokens_per_s", "grad_norm", "terms/ce", "terms/forward_kl", "terms/reverse_kl"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], (tag, scalars.get(tag))
    # the mid-run evaluation at step 2 and the final one at the last step
    assert [s for s, _ in scalars["eval/student_perplexity"]] == [2]
    assert [s for s, _ in scalars["eval/kl_per_token"]] == [2]
    assert [s for s, _ in scalars["final/student/perplexity"]] == [4]
    assert "final/teacher/perplexity" in scalars
    # the values are the logged ones, not placeholders
    import json
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in logged if "loss" in x]
    assert [round(v, 5) for _, v in scalars["loss"]] == pytest.approx(losses, abs=1e-5)


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, teacher_dir, chat_file):
    import importlib.util
    if importlib.util.find_spec("swanlab") is not None:
        pytest.skip("swanlab is installed here")
    r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "o"), "train.report_to=[swanlab]",
                "--no-progress")
    assert_user_error(r, r"train.report_to=\[swanlab\] needs: pip install swanlab")
    assert not (tmp_path / "o").exists()


def test_an_unknown_tracker_is_refused_when_the_config_is_read(tmp_path):
    r = run_cli("distill", "train.report_to=[tensorbored]", "--print-config")
    assert_user_error(r, r"train.report_to")


def test_trackio_keeps_its_database_in_the_run_and_gets_the_same_numbers(tmp_path, teacher_dir, chat_file):
    pytest.importorskip("trackio")
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRACKIO_DIR"}
    r = subprocess.run([sys.executable, "-m", "stillroom", "distill", *tiny_overrides(teacher_dir, chat_file, out),
                        "train.max_steps=4", "train.eval_every=2", "train.report_to=[trackio]", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "trackio").is_dir()
    read = ("import json, trackio; from trackio import SQLiteStorage as S; r = S.get_runs('stillroom');"
            "print(json.dumps(S.get_logs('stillroom', r[0])))")
    got = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=300,
                         env={**env, "TRACKIO_DIR": str(out / "trackio")})
    assert got.returncode == 0, got.stderr[-2000:]
    logs = json.loads(got.stdout.strip().splitlines()[-1])
    steps = [x for x in logs if "loss" in x]
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert [x["loss"] for x in steps] == [x["loss"] for x in logged if "loss" in x]
    assert any("eval/kl_per_token" in x for x in logs) and any("final/student/perplexity" in x for x in logs)
