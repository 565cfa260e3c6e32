"""Kill anywhere, lose nothing: a short distillation (and a cache build) killed with SIGKILL at
named points -- mid-step, mid-checkpoint, mid-rotation, mid-eval, on the prefetch thread, while
writing the final model or a cache shard -- then resumed with the same command, ends bit-identical
to an uninterrupted run with the same seed.

The points are failpoints (stillroom/run/faults.py): `STILLROOM_FAULT=NAME:N` SIGKILLs the process the
N-th time it reaches NAME, so every run of this test kills at exactly the same place.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from stillroom.run.outputs import checkpoints
from stillroom.teachers.cache import TeacherCache

from conftest import stillroom_process, tiny_overrides

RUN = ["train.max_steps=8", "train.save_every=2", "train.keep_checkpoints=2", "train.eval_every=3",
       "train.log_every=1", "train.batch_size=2", "data.pack=true"]


def stillroom(*args, fault=None, check=True):
    env = dict(os.environ)
    env.pop("STILLROOM_FAULT", None)
    if fault:
        env["STILLROOM_FAULT"] = fault
    r = stillroom_process([*args, "--no-progress"], env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def distill_args(teacher_dir, data, out):
    return ["distill", *tiny_overrides(teacher_dir, data, out), *RUN]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, chat_file):
    out = tmp_path_factory.mktemp("ref") / "run"
    stillroom(*distill_args(teacher_dir, chat_file, out))
    return load_file(out / "final" / "model.safetensors")


def resume_until_done(args, out, tries=3):
    """What a user does after a crash: the same command with --resume (or, before the first
    checkpoint, again from the start)."""
    for _ in range(tries):
        r = stillroom(*args, "--resume" if checkpoints(out) else "--overwrite", check=False)
        if r.returncode == 0:
            return
    raise AssertionError(r.stderr[-3000:])


# (failpoint, what was happening)
DISTILL_POINTS = [
    ("step:1", "after the first optimizer step, before any checkpoint"),
    ("step:5", "mid-run, between checkpoints"),
    ("batch:4", "on the prefetch thread, building a later step's batches"),
    ("checkpoint.written:1", "mid-checkpoint: files in the temporary folder, not marked complete"),
    ("checkpoint.complete:2", "checkpoint complete in its temporary folder, not yet renamed"),
    ("checkpoint.renamed:3", "new checkpoint renamed in, old ones not yet rotated"),
    ("checkpoint.rotating:1", "mid-rotation: an old checkpoint renamed away, not yet deleted"),
    ("eval:1", "during an intermediate evaluation"),
    ("metrics:5", "right after a log line past the last checkpoint"),
    ("final.written:1", "final model written to final.tmp, not yet swapped in"),
]


@pytest.mark.parametrize("point,when", DISTILL_POINTS, ids=[p for p, _ in DISTILL_POINTS])
def test_distill_killed_anywhere_resumes_bit_identical(point, when, tmp_path, teacher_dir, chat_file, reference):
    out = tmp_path / "run"
    args = distill_args(teacher_dir, chat_file, out)
    r = stillroom(*args, fault=point, check=False)
    assert r.returncode == -signal.SIGKILL, f"{point} was never reached: {r.stderr[-2000:]}"
    # a half-written checkpoint is never picked up
    for c in checkpoints(out):
        assert (c / "trainer_state.json").is_file() and not c.name.endswith((".tmp", ".old"))
    resume_until_done(args, out)
    got = load_file(out / "final" / "model.safetensors")
    assert got.keys() == reference.keys()
    for k in got:
        assert torch.equal(got[k], reference[k]), f"{point}: {k} differs"
    left = {p.name for p in (out / "checkpoints").iterdir()}
    assert left == {"step_0000006", "step_0000008"}, left   # rotation kept the newest two, nothing stale
    steps = [l for l in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in l and '"eval"' not in l]
    assert [int(__import__("json").loads(l)["step"]) for l in steps] == list(range(1, 9))   # one line per step


def codistill_args(teacher_dir, data, out):
    over = [o for o in tiny_overrides(teacher_dir, data, out) if not o.startswith("student.")]
    return ["codistill", "codistill", *over, "peers.0.num_layers=2", "peers.1.layers=[0,3]", *RUN]


@pytest.fixture(scope="module")
def codistill_reference(tmp_path_factory, teacher_dir, chat_file):
    out = tmp_path_factory.mktemp("ref_codistill") / "run"
    stillroom(*codistill_args(teacher_dir, chat_file, out))
    return {n: load_file(out / "final" / n / "model.safetensors") for n in ("a", "b")}


CODISTILL_POINTS = ["step:5", "batch:4", "checkpoint.complete:2", "checkpoint.rotating:1", "eval:1",
                    "final.written:1"]


@pytest.mark.parametrize("point", CODISTILL_POINTS)
def test_codistill_killed_anywhere_resumes_bit_identical(point, tmp_path, teacher_dir, chat_file,
                                                         codistill_reference):
    """Co-distillation runs on the same loop: killed at the same points, it resumes to the
    uninterrupted run's peers, bit for bit, with one log line per step."""
    out = tmp_path / "run"
    args = codistill_args(teacher_dir, chat_file, out)
    r = stillroom(*args, fault=point, check=False)
    assert r.returncode == -signal.SIGKILL, f"{point} was never reached: {r.stderr[-2000:]}"
    resume_until_done(args, out)
    for name, ref in codistill_reference.items():
        got = load_file(out / "final" / name / "model.safetensors")
        for k in got:
            assert torch.equal(got[k], ref[k]), f"{point}: peer {name} {k} differs"
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step_0000006", "step_0000008"}
    steps = [l for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' not in l]
    assert [int(__import__("json").loads(l)["step"]) for l in steps] == list(range(1, 9))


CACHE_POINTS = ["cache.batch:2", "cache.shard_written:2", "cache.shard_renamed:1"]


@pytest.mark.parametrize("point", CACHE_POINTS)
def test_cache_build_killed_anywhere_continues_bit_identical(point, tmp_path, teacher_dir, chat_file):
    def args(path):
        return ["cache", *tiny_overrides(teacher_dir, chat_file, tmp_path / "unused"), f"cache.path={path}",
                "cache.shard_rows=300", "cache.batch_size=4", "cache.top_k=8"]
    stillroom(*args(tmp_path / "ref"))
    r = stillroom(*args(tmp_path / "c"), fault=point, check=False)
    assert r.returncode == -signal.SIGKILL, f"{point} was never reached: {r.stderr[-2000:]}"
    stillroom(*args(tmp_path / "c"))   # the same command continues
    ref, got = TeacherCache(tmp_path / "ref"), TeacherCache(tmp_path / "c")
    assert ref.where.keys() == got.where.keys() and got.index["complete"]
    assert not list((tmp_path / "c").glob("*.tmp"))
    for sid in ref.where:
        for a, b in zip(_rows(ref, sid), _rows(got, sid)):
            assert torch.equal(a, b), point


def _rows(cache, sid):
    n, start, count, _ = cache.where[sid]
    f = cache._shard(n)
    return [f.get_slice(k)[start:start + count] for k in ("ids", "logp", "tail", "label_logp")]


def interrupt_after_step_2(args, out):
    """Start a run, press Ctrl-C once its log shows step 2; -> (exit code, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "stillroom", *map(str, args), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and '"step": 2' in log.read_text()):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def test_sigint_saves_a_checkpoint_and_resumes_exactly(tmp_path, teacher_dir, chat_file, reference):
    """Ctrl-C: the step in flight finishes, a checkpoint is written, exit 130; --resume finishes
    with the uninterrupted run's weights."""
    out = tmp_path / "run"
    args = distill_args(teacher_dir, chat_file, out) + ["train.save_every=0"]
    code, err = interrupt_after_step_2(args, out)
    assert code == 130, err[-3000:]
    assert "stopped by SIGINT" in err and "--resume" in err and "Traceback" not in err
    assert checkpoints(out), "no checkpoint written on SIGINT"
    stillroom(*args, "--resume")
    got = load_file(out / "final" / "model.safetensors")
    for k in got:
        assert torch.equal(got[k], reference[k]), k


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, teacher_dir, chat_file, reference):
    """Output on a 600 KB tmpfs: the step-2 checkpoint fits, the step-4 one does not. One clear
    line, exit 2, step 2 intact and loadable, no partial folder; moved to a roomy disk, --resume
    ends with the uninterrupted run's weights."""
    import shutil
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = mnt / "run"
        r = stillroom(*distill_args(teacher_dir, chat_file, out), check=False)
        errors = [x for x in r.stderr.splitlines() if x.startswith("stillroom: error:")]
        assert r.returncode == 2, r.stderr[-3000:]
        assert len(errors) == 1 and "no space left" in errors[0] and "step_0000002" in errors[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert [c.name for c in checkpoints(out)] == ["step_0000002"]
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]   # no partial folder
        load_file(out / "checkpoints" / "step_0000002" / "model.safetensors")
        shutil.copytree(out, tmp_path / "moved")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    moved = tmp_path / "moved"
    stillroom(*distill_args(teacher_dir, chat_file, moved), "--resume")
    got = load_file(moved / "final" / "model.safetensors")
    for k in got:
        assert torch.equal(got[k], reference[k]), k


def test_sigint_stops_codistill_cleanly_and_resumes_exactly(tmp_path, teacher_dir, chat_file):
    over = [o for o in tiny_overrides(teacher_dir, chat_file, tmp_path / "x") if not o.startswith(("student.",
                                                                                                 "train.output_dir"))]
    over += ["peers.0.num_layers=2", "peers.1.layers=[0,3]", "train.max_steps=8", "train.log_every=1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    stillroom("codistill", "codistill", *over, f"train.output_dir={ref}")
    code, err = interrupt_after_step_2(["codistill", "codistill", *over, f"train.output_dir={out}"], out)
    assert code == 130 and "stopped by SIGINT" in err and "Traceback" not in err, err[-3000:]
    stillroom("codistill", "codistill", *over, f"train.output_dir={out}", "--resume")
    for name in ("a", "b"):
        a = load_file(ref / "final" / name / "model.safetensors")
        b = load_file(out / "final" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
