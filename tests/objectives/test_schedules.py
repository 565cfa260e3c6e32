"""Schedules for alpha and temperature: values at chosen steps, and what a run logs."""
import json
import math

import pytest

from stillroom.recipes import load_config
from stillroom.errors import UserError
from stillroom.config import scheduled
from stillroom.run.distill import distill

from conftest import tiny_overrides


def test_schedule_values_at_chosen_steps():
    assert scheduled(0.9, None, 5, 11, "linear") == 0.9            # no end: constant
    assert scheduled(0.9, 0.1, 5, 11, "constant") == 0.9
    assert scheduled(4.0, 1.0, 0, 11, "linear") == 4.0
    assert scheduled(4.0, 1.0, 5, 11, "linear") == pytest.approx(2.5)
    assert scheduled(4.0, 1.0, 10, 11, "linear") == 1.0
    assert scheduled(4.0, 1.0, 50, 11, "linear") == 1.0            # past the end: held
    assert scheduled(0.0, 1.0, 5, 11, "cosine") == pytest.approx(0.5)
    assert scheduled(0.0, 1.0, 2, 11, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.2)))
    assert scheduled(0.0, 1.0, 2, 11, "cosine") < scheduled(0.0, 1.0, 2, 11, "linear")   # slow start
    with pytest.raises(ValueError):
        scheduled(0.0, 1.0, 2, 11, "zigzag")


def test_a_run_logs_the_scheduled_values(tmp_path, teacher_dir, chat_file):
    cfg = load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "r") + [
        "train.max_steps=5", "loss.schedule=linear", "loss.alpha=1.0", "loss.alpha_end=0.5",
        "loss.temperature=3.0", "loss.temperature_end=1.0"])
    distill(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert [r["alpha"] for r in rows] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])
    assert [r["temperature"] for r in rows] == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0])
    assert cfg.loss.weights(2, 5) == pytest.approx((0.75, 2.0))
    assert cfg.loss.spec(2, 5) == pytest.approx({"ce": 0.25, "forward_kl": 0.75})


def test_a_temperature_schedule_needs_a_live_teacher(tmp_path, teacher_dir, chat_file):
    with pytest.raises(UserError, match="live teacher"):   # refused when the config is read
        distill(load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "r") + [
            "loss.temperature_end=1.0", "loss.temperature=2.0", "teacher.kind=cache", f"teacher.cache={tmp_path}"]),
            progress=False)


def test_a_scheduled_alpha_brings_its_teacher_term_to_the_rules_even_from_0(tmp_path):
    """The rules read every term some step weighs (LossConfig.spec at the first and the last step):
    alpha scheduled up from 0 still asks a cache for reverse KL, which it cannot give."""
    base = ["teacher.kind=cache", f"teacher.cache={tmp_path}", "loss.divergence=reverse_kl", "loss.schedule=linear"]
    with pytest.raises(UserError, match="full distribution"):
        load_config(None, base + ["loss.alpha=0", "loss.alpha_end=0.9"])
    with pytest.raises(UserError, match="full distribution"):
        load_config(None, base + ["loss.alpha=0.9", "loss.alpha_end=0"])
    cfg = load_config(None, base + ["loss.alpha=0"])   # no teacher term at any step: nothing to refuse
    assert cfg.loss.spec(0, 10) == cfg.loss.spec(9, 10) == {"ce": 1.0}
    hard = load_config(None, ["loss.kind=hard", "loss.alpha=0.25"])
    assert hard.loss.spec() == {"ce": 0.75, "hard": 0.25}
