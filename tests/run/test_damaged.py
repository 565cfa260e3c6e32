"""Damaged or changed files a run reads back (issue 30, items 4-6): a checkpoint torn after it was
marked complete, data edited in place between a run and its --resume, a data store truncated or
zeroed. Each is caught before it is used: skipped with a line saying which and why, or refused in
one line (exit 2) saying what to do."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stillroom.run.outputs import checkpoints

from conftest import run_cli, tiny_overrides

RUN = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=2", "train.eval_every=0",
       "train.batch_size=2", "--no-progress"]


def distill(teacher_dir, data, out, *more):
    return run_cli("distill", *tiny_overrides(teacher_dir, data, out), *RUN, *more)


def one_line(r) -> str:
    errors = [x for x in r.stderr.splitlines() if x.startswith("stillroom: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_dir, chat_file):
    """A 6-step run with checkpoints at steps 4 and 6, and its final weights."""
    out = tmp_path_factory.mktemp("finished") / "run"
    r = distill(teacher_dir, chat_file, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [c.name for c in checkpoints(out)] == ["step_0000004", "step_0000006"]
    return out


def truncate(p):
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def zero(p):   # the same size, every byte zero: only the checksum can tell
    p.write_bytes(bytes(p.stat().st_size))


def garble(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("name,how", [("model.safetensors", truncate), ("model.safetensors", garble),
                                      ("optimizer.bin", zero), ("trainer_state.json", truncate),
                                      ("custom_checkpoint_0.pkl", garble)],
                         ids=["model-truncated", "model-one-byte", "optimizer-zeroed", "state-truncated",
                              "scheduler-garbled"])
def test_resume_falls_back_past_a_damaged_checkpoint(name, how, finished, tmp_path, teacher_dir, chat_file):
    """The newest checkpoint damaged after it was marked complete: --resume says which one it skips
    and why, sets it aside (step_N.damaged), resumes from the one before and ends with the
    uninterrupted run's weights."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    newest = out / "checkpoints" / "step_0000006"
    target = newest / name
    how(target)
    r = distill(teacher_dir, chat_file, out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [x for x in r.stderr.splitlines() if "damaged" in x]
    assert len(said) == 1 and "step_0000006" in said[0] and target.name in said[0], r.stderr[-3000:]
    assert (out / "checkpoints" / "step_0000006.damaged").is_dir()
    assert "resumed from" in r.stderr and "step_0000004" in r.stderr
    want, got = load_file(finished / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_resume_with_every_checkpoint_damaged_is_one_line(finished, tmp_path, teacher_dir, chat_file):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for c in checkpoints(out):
        truncate(c / "model.safetensors")
    before = sorted(p.name for p in out.iterdir())
    line = one_line(distill(teacher_dir, chat_file, out, "--resume"))
    assert "no intact checkpoint" in line and "--overwrite" in line, line
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_refuses_data_changed_in_place(tmp_path, teacher_dir, chat_file):
    """The data edited between the run and its --resume, at the same size and modification time:
    refused in one line; only touched (same content, new mtime): resumed."""
    data, out = tmp_path / "chat.jsonl", tmp_path / "run"
    shutil.copy(chat_file, data)
    r = distill(teacher_dir, data, out, "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "inputs.json").read_text())["data.path"]
    st = data.stat()
    text = data.read_text()
    data.write_text(text.replace("cat number 1.", "dog number 1."))   # same length
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size
    line = one_line(distill(teacher_dir, data, out, "train.max_steps=6", "--resume"))
    assert "data changed" in line and "data.path" in line, line
    data.write_text(text)   # back as it was, with a new modification time
    r = distill(teacher_dir, data, out, "train.max_steps=6", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("name,how", [("tokens.npy", truncate), ("tokens.npy", zero), ("index.json", truncate),
                                      ("segs.npy", garble)],
                         ids=["tokens-truncated", "tokens-zeroed", "index-truncated", "segs-garbled"])
def test_a_damaged_data_store_is_refused_with_how_to_rebuild(name, how, tmp_path, teacher_dir, chat_file):
    """A store damaged after its build (truncated, zeroed at the same size, one byte changed) is
    refused in one line naming it and saying how to rebuild it; removed as told, the next run
    builds it again and runs."""
    base = tmp_path / "stores"
    args = ["prepare", *tiny_overrides(teacher_dir, chat_file, tmp_path / "run"), f"data.store={base}"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    (folder,) = base.glob("store-*")
    how(folder / name)
    line = one_line(run_cli(*args))
    assert str(folder) in line and "damaged" in line and f"rm -r {folder}" in line, line
    line = one_line(run_cli("distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "run"),
                            f"data.store={base}", "--no-progress"))
    assert "damaged" in line
    assert not (tmp_path / "run").exists()   # refused before the run folder was made
    shutil.rmtree(folder)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]


def _sample_rows(cache) -> dict:
    """{sample id: its (ids, logp, tail, label_logp) rows} of a cache, whatever its shard layout."""
    out = {}
    for sid, (n, start, count, _) in cache.where.items():
        f = cache._shard(n)
        out[sid] = [f.get_slice(k)[start:start + count] for k in ("ids", "logp", "tail", "label_logp")]
    return out


def test_a_damaged_cache_shard_is_refused_then_cached_again(tmp_path, teacher_dir, chat_file):
    """A cache shard garbled after it was written: training from the cache is refused in one line
    that says to run `stillroom cache` again; that run sets the shard aside, caches its samples
    again, and every sample reads as in an undamaged cache, bit for bit."""
    from stillroom.teachers.cache import TeacherCache

    cache, ref = tmp_path / "cache", tmp_path / "ref"
    over = [*tiny_overrides(teacher_dir, chat_file, tmp_path / "run"), "cache.shard_rows=300", "--no-progress"]
    for c in (cache, ref):
        assert run_cli("cache", *over, f"cache.path={c}").returncode == 0
    shards = sorted(cache.glob("shard-*.safetensors"))
    assert len(shards) >= 3
    garble(shards[1])
    line = one_line(run_cli("distill", *over, "teacher.kind=cache", f"teacher.cache={cache}"))
    assert shards[1].name in line and "stillroom cache" in line, line
    r = run_cli("cache", *over, f"cache.path={cache}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "damaged" in r.stderr and (cache / (shards[1].name + ".damaged")).exists()
    got, want = _sample_rows(TeacherCache(cache)), _sample_rows(TeacherCache(ref))
    assert got.keys() == want.keys()
    assert all(torch.equal(a, b) for sid in want for a, b in zip(got[sid], want[sid]))
    r = run_cli("distill", *over, "teacher.kind=cache", f"teacher.cache={cache}", "train.max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
