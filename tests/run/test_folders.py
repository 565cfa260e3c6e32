"""Nothing lost: --overwrite replaces only what stillroom made (and never a command's own input),
one command at a time holds a folder (a lock that a killed run does not leave behind), and
--resume refuses a config that would change what the run computes."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from stillroom import cli
from stillroom.errors import UserError
from stillroom.run import folders

from conftest import tiny_overrides

RUN = ["train.max_steps=4", "train.save_every=2", "train.batch_size=2", "--no-progress"]


def popen(*args, env=None):
    e = dict(os.environ)
    e.pop("STILLROOM_FAULT", None)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "stillroom", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e)


def stillroom(*args, env=None):
    p = popen(*args, env=env)
    out, err = p.communicate(timeout=600)
    return p.returncode, err


def error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("stillroom: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def snapshot(root):
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()
            and p.name not in folders.OWN}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_dir, chat_file):
    out = tmp_path_factory.mktemp("runs") / "done"
    assert cli.main(["distill", *tiny_overrides(teacher_dir, chat_file, out), *RUN]) == 0
    return out


# ---- what --overwrite may replace

def test_a_run_is_marked_and_its_lock_is_gone_when_it_ends(finished):
    assert folders.kind_of(finished) == "run"
    assert json.loads((finished / folders.MARKER).read_text())["kind"] == "run"
    assert not (finished / folders.HOLDER).exists() and not (finished / folders.LOCK).exists()


def test_cache_overwrite_refuses_a_finished_run(finished, teacher_dir, chat_file, capsys):
    before = snapshot(finished)
    code = cli.main(["cache", f"teacher.model={teacher_dir}", f"data.path={chat_file}", "data.seq_len=64",
                     f"cache.path={finished}", "--overwrite", "--no-progress"])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "stillroom run, not a cache" in line
    assert snapshot(finished) == before                       # final/, config, metrics, report: all there


def test_cache_without_overwrite_on_a_run_does_not_recommend_overwrite(finished, teacher_dir, chat_file, capsys):
    code = cli.main(["cache", f"teacher.model={teacher_dir}", f"data.path={chat_file}", "data.seq_len=64",
                     f"cache.path={finished}", "--no-progress"])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "stillroom run" in line and "--overwrite" not in line


@pytest.mark.parametrize("command", ["distill", "codistill"])
def test_overwrite_refuses_a_folder_stillroom_did_not_make(command, tmp_path, teacher_dir, chat_file, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    argv = [command, *tiny_overrides(teacher_dir, chat_file, out), "--overwrite", "--no-progress"]
    if command == "codistill":
        argv = [command, "codistill", *tiny_overrides(teacher_dir, chat_file, out)[:3], "--overwrite", "--no-progress"]
    assert cli.main(argv) == 2
    assert "not made by stillroom" in error_line(capsys.readouterr().err)
    assert (out / "notes.txt").read_text() == "my thesis" and sorted(os.listdir(out)) == ["notes.txt"]


def test_overwrite_refuses_a_run_folder_that_holds_the_data(finished, tmp_path, teacher_dir, chat_file, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    data = run / "train.jsonl"
    shutil.copy(chat_file, data)                 # the user keeps the data inside the run folder
    assert cli.main(["distill", *tiny_overrides(teacher_dir, data, run), "--overwrite", "--no-progress"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "an input of this command" in line and str(data) in line
    assert data.read_bytes() == chat_file.read_bytes() and (run / "final" / "model.safetensors").is_file()


def test_overwrite_refuses_a_cache_folder_that_holds_the_teacher(tmp_path, teacher_dir, chat_file, capsys):
    import shutil
    cache = tmp_path / "cache"
    cache.mkdir()
    folders.mark(cache, "cache")
    teacher = cache / "teacher-model"
    shutil.copytree(teacher_dir, teacher)
    assert cli.main(["cache", f"teacher.model={teacher}", f"data.path={chat_file}", "data.seq_len=64",
                     f"cache.path={cache}", "--overwrite", "--no-progress"]) == 2
    assert "an input of this command" in error_line(capsys.readouterr().err)
    assert (teacher / "config.json").is_file()


def test_overwrite_replaces_a_run_and_a_cache_stillroom_made(finished, tmp_path, teacher_dir, chat_file):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "final" / "stale.txt").write_text("from the old run")
    assert cli.main(["distill", *tiny_overrides(teacher_dir, chat_file, run), *RUN, "--overwrite"]) == 0
    assert not (run / "final" / "stale.txt").exists() and folders.kind_of(run) == "run"
    cache = tmp_path / "cache"
    args = ["cache", f"teacher.model={teacher_dir}", f"data.path={chat_file}", "data.seq_len=64",
            f"cache.path={cache}", "--no-progress"]
    assert cli.main(args) == 0 and folders.kind_of(cache) == "cache"
    assert cli.main(args + ["--overwrite"]) == 0


def test_folders_made_before_the_marker_are_recognised_only_when_they_hold_nothing_else(tmp_path):
    legacy = tmp_path / "legacy"
    (legacy / "final").mkdir(parents=True)
    (legacy / "config.yaml").write_text("train: {}\n")
    (legacy / "metrics.jsonl").write_text("")
    assert folders.kind_of(legacy) == "run"
    folders.check_replace(legacy, "run")
    (legacy / "data.jsonl").write_text("{}\n")           # something that is not ours
    assert folders.kind_of(legacy) is None
    with pytest.raises(UserError, match="not made by stillroom"):
        folders.check_replace(legacy, "run")
    cache = tmp_path / "oldcache"
    cache.mkdir()
    (cache / "index.json").write_text("{}")
    (cache / "shard-00000.safetensors").write_bytes(b"")
    assert folders.kind_of(cache) == "cache"


def test_another_process_checking_it_can_write_is_not_a_foreign_entry(tmp_path):
    """In a launch every process checks the output folder is writable (a passing empty folder)
    while the main one decides whether --overwrite may replace it: the check is bookkeeping, and
    the refusal of a foreign folder names what it holds."""
    from stillroom.run.outputs import check_writable, prepare_output
    out = tmp_path / "run"
    out.mkdir()
    (out / f"{folders.PROBE}x1y2").mkdir()        # another process's check, caught mid-way
    assert folders.entries(out) == []
    prepare_output(out, overwrite=True, resume=False)
    prepare_output(out, overwrite=False, resume=False)
    check_writable(out)
    assert sorted(os.listdir(out)) == [f"{folders.PROBE}x1y2"]   # the check leaves nothing of its own
    (out / "thesis.txt").write_text("mine")
    with pytest.raises(UserError, match=r"not made by stillroom \(no .stillroom.json in it; it holds thesis.txt\)"):
        prepare_output(out, overwrite=True, resume=False)


def test_a_symlinked_input_inside_the_folder_counts_as_inside(tmp_path, chat_file):
    out = tmp_path / "out"
    out.mkdir()
    folders.mark(out, "run")
    link = tmp_path / "data-link.jsonl"
    (out / "data.jsonl").write_bytes(chat_file.read_bytes())
    link.symlink_to(out / "data.jsonl")
    with pytest.raises(UserError, match="an input of this command"):
        folders.check_replace(out, "run", [str(link)])


# ---- one holder at a time

def test_a_second_claim_is_refused_with_the_holder_and_a_stale_one_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    with folders.claim(out):
        with pytest.raises(UserError, match=rf"in use by another stillroom command \(pid {os.getpid()} on "):
            folders.Claim(out, "train.output_dir").acquire()
    assert not (out / folders.HOLDER).exists()
    # a holder record left by a process that died (its flock went with it)
    (out / folders.HOLDER).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "then"}))
    with caplog.at_level("WARNING", logger="stillroom"):
        with folders.claim(out):
            pass
    assert "taking over the lock left by pid 999999 on elsewhere" in caplog.text


def test_a_refused_command_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(UserError):
        with folders.claim(out):
            raise UserError("bad input found after the lock")
    assert not out.exists()


def test_only_the_main_process_judges_whether_the_output_folder_is_taken(tmp_path, monkeypatch):
    """A launch's other processes check the folder after the main one has claimed and begun to
    write it (CI saw process 1 refuse its own run's folder as "already exists")."""
    from stillroom.run.outputs import prepare_output
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match="already exists"):
        prepare_output(out, overwrite=False, resume=False)
    monkeypatch.setenv("RANK", "1")
    prepare_output(out, overwrite=False, resume=False)
    with pytest.raises(UserError, match="no complete checkpoint"):   # what every process can check still is
        prepare_output(out, overwrite=False, resume=True)


def wait_for(path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.2)


def test_two_runs_on_one_folder_the_second_is_refused_and_the_first_is_unharmed(tmp_path, teacher_dir, chat_file):
    ref = tmp_path / "ref"
    code, err = stillroom("distill", *tiny_overrides(teacher_dir, chat_file, ref), *RUN)
    assert code == 0, err[-3000:]
    out = tmp_path / "run"
    # the first run pauses 20 s at its third step (its step-2 checkpoint is written by then)
    first = popen("distill", *tiny_overrides(teacher_dir, chat_file, out), *RUN,
                  env={"STILLROOM_FAULT": "step:3:sleep=20"})
    wait_for(out / "checkpoints" / "step_0000002" / "trainer_state.json", first)
    t0 = time.time()
    others = [popen("distill", *tiny_overrides(teacher_dir, chat_file, out), *RUN, again)
              for again in ("--resume", "--overwrite")]
    for p in others:
        _, err = p.communicate(timeout=600)
        line = error_line(err)
        assert p.returncode == 2 and "in use by another stillroom command" in line and f"pid {first.pid} " in line
    assert first.poll() is None, "the first run ended before the others were refused: the test proved nothing"
    assert time.time() - t0 < 20
    assert first.wait(timeout=600) == 0, first.communicate()[1][-3000:]
    a, b = load_file(out / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, teacher_dir, chat_file):
    out = tmp_path / "run"
    first = popen("distill", *tiny_overrides(teacher_dir, chat_file, out), *RUN, env={"STILLROOM_FAULT": "step:3"})
    assert first.wait(timeout=600) == -9                       # SIGKILLed at step 3: its holder record stays
    held = json.loads((out / folders.HOLDER).read_text())
    assert held["pid"] == first.pid
    code, err = stillroom("distill", *tiny_overrides(teacher_dir, chat_file, out), *RUN, "--resume")
    assert code == 0, err[-3000:]
    assert f"taking over the lock left by pid {first.pid} " in err


# ---- honest resume

def test_resume_refuses_settings_that_change_the_run_and_records_the_ones_that_do_not(tmp_path, teacher_dir,
                                                                                      chat_file, capsys):
    out = tmp_path / "run"
    base = tiny_overrides(teacher_dir, chat_file, out)
    assert cli.main(["distill", *base, *RUN]) == 0
    before = snapshot(out)
    for change, words in ((["data.seq_len=96"], "data.seq_len 64 -> 96"),
                          (["train.max_steps=2"], "train.max_steps 4 -> 2"),
                          (["train.lr=0.01", "train.seed=3"], "train.lr 0.001 -> 0.01; train.seed 0 -> 3")):
        capsys.readouterr()
        assert cli.main(["distill", *base, *RUN, *change, "--resume"]) == 2
        assert words in error_line(capsys.readouterr().err)
        assert snapshot(out) == before                       # nothing rewritten
    # a run written before a setting existed: the setting is named as newer than the run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    older = dict(saved, loss={k: v for k, v in saved["loss"].items() if k != "compile"})
    (out / "config.yaml").write_text(yaml.safe_dump(older))
    capsys.readouterr()
    assert cli.main(["distill", *base, *RUN, "--resume"]) == 2
    assert "loss.compile (not in its config.yaml: a setting newer than the run) -> 'auto'" in \
        error_line(capsys.readouterr().err)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    before = snapshot(out)
    # raising max_steps and changing how it logs: allowed, and said
    assert cli.main(["distill", *base, *RUN, "train.max_steps=6", "train.log_every=2", "--resume"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    changed = [r for r in recs if "config_changed" in r]
    assert changed == [{"step": 4, "config_changed": {"train.log_every": [1, 2], "train.max_steps": [4, 6]}}]
    assert max(r["step"] for r in recs if "loss" in r) == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 6


def test_generate_holds_its_answers_file_and_a_second_writer_is_refused(tmp_path, teacher_dir):
    """Two `generate` commands on one --out: the second is refused at once naming the first; a
    generate into another file of the same folder is not held up."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Tell me about thing {i}.\n" for i in range(6)))
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--teacher", teacher_dir, "--prompts", prompts, "--max-new-tokens", "4", "--batch-size", "2",
            "--no-progress"]
    # the first pauses 20 s after its first batch (its progress record is written by then)
    first = popen(*args, "--out", out, env={"STILLROOM_FAULT": "generate.batch:1:sleep=20"})
    wait_for(out.with_name(out.name + ".progress.json"), first)
    t0 = time.time()
    code, err = stillroom(*args, "--out", out)
    assert code == 2 and f"--out {out} is in use by another stillroom command" in error_line(err)
    assert f"pid {first.pid} " in error_line(err)
    code, err = stillroom(*args, "--out", tmp_path / "other.jsonl")
    assert code == 0, err[-2000:]
    assert first.poll() is None and time.time() - t0 < 20, "the first generate ended early: the test proved nothing"
    assert first.wait(timeout=600) == 0, first.communicate()[1][-3000:]
    assert len(out.read_text().splitlines()) == 6
    assert not list(tmp_path.glob(".answers.jsonl.*"))   # the lock is gone with its holder
