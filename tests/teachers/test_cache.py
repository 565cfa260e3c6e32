"""The top-k teacher cache: round trip (k = V is the dense loss), alignment by sample id across
shuffled epochs, refusal of a cache built for something else, resume after a kill, and training
from the cache without loading the teacher."""
import json

import pytest
import torch
from safetensors.torch import load_file

from stillroom.recipes import load_config
from stillroom.data.examples import micro_batch
from stillroom.data.store import load_data
from stillroom.errors import UserError
from stillroom.losses import distill_loss, hybrid, topk_targets
from stillroom.models import core as models
from stillroom.run.distill import distill
from stillroom.data.examples import to_batch
from stillroom.teachers import cache as cache_mod
from stillroom.teachers.cache import TeacherCache, positions

from conftest import assert_user_error, cfg_for, make_cache, make_tokenizer, run_cli, tiny_overrides


def test_cache_with_k_equal_vocab_gives_the_dense_loss(tmp_path, teacher_dir, chat_file):
    V = models.logits_width(models.load(str(teacher_dir)).model)
    cfg, teacher, train, _ = make_cache(teacher_dir, chat_file, tmp_path / "c", f"cache.top_k={V}",
                                        "cache.dtype=float32")
    cache = TeacherCache(tmp_path / "c")
    b = to_batch(train[:4], teacher.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        dense = teacher.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    s = torch.randn(dense.shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    cached = cache.targets(b.examples, b.input_ids.shape[1], "cpu").top
    a = distill_loss(s, cached, b.targets, hybrid(0.7), 2.0)
    (ga,) = torch.autograd.grad(a, s)
    d = distill_loss(s, dense, b.targets, hybrid(0.7), 2.0)
    (gd,) = torch.autograd.grad(d, s)
    assert a.item() == pytest.approx(d.item(), rel=1e-5)
    torch.testing.assert_close(ga, gd, rtol=1e-4, atol=1e-6)


def test_lookups_follow_sample_ids_across_shuffled_epochs(tmp_path, teacher_dir, chat_file):
    cfg, teacher, train, _ = make_cache(teacher_dir, chat_file, tmp_path / "c", "cache.top_k=8",
                                        "cache.dtype=float32", "cache.shard_rows=100")
    cache = TeacherCache(tmp_path / "c")
    assert len(cache.index["shards"]) > 2
    per_epoch = len(train) // 4
    for index in (0, per_epoch + 1, 3 * per_epoch + 2):  # batches from three different epochs
        b = to_batch(micro_batch(train, index, 4, seed=7), teacher.tokenizer.pad_token_id, "cpu")
        got = cache.targets(b.examples, b.input_ids.shape[1], "cpu")
        with torch.no_grad():
            live = topk_targets(teacher.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits,
                                8, temperature=2.0)
        valid = b.targets != -100
        assert torch.equal(got.top.ids[valid], live.ids[valid])
        torch.testing.assert_close(got.top.logp[valid], live.logp[valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.top.log_tail[valid], live.log_tail[valid], rtol=1e-5, atol=1e-5)


def test_mismatched_cache_is_refused(tmp_path, teacher_dir, chat_file, text_file):
    cfg, teacher, train, held = make_cache(teacher_dir, chat_file, tmp_path / "c", "cache.top_k=8")
    cache = TeacherCache(tmp_path / "c")
    other_tok = make_tokenizer()
    other_tok.add_tokens(["<|extra|>"])
    with pytest.raises(UserError, match="another tokenizer"):
        cache.check(cfg, other_tok, {"training": train})
    run = ["teacher.kind=cache", f"teacher.cache={tmp_path / 'c'}", "student.init=config", "student.hidden_size=32",
           "student.num_heads=4", "loss.temperature=2.0"]
    base = tiny_overrides(teacher_dir, chat_file, tmp_path / "o")
    assert_user_error(run_cli("distill", *base, *run, "data.seq_len=32"), r"data.seq_len=64")
    assert_user_error(run_cli("distill", *base, *run, "loss.temperature=1.0"), r"temperature 2.0")
    assert_user_error(run_cli("distill", *tiny_overrides(teacher_dir, text_file, tmp_path / "o"), *run),
                      r"no entry for \d+ of the \d+ training examples")
    assert_user_error(run_cli("distill", *base, *run[:1], f"teacher.cache={tmp_path}"), r"no index.json")
    assert not (tmp_path / "o").exists()
    # a cache command on a folder holding a different cache
    r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={chat_file}", "data.seq_len=64",
                f"cache.path={tmp_path / 'c'}", "cache.top_k=4", "loss.temperature=2.0")
    assert_user_error(r, r"built differently \(top_k: 8 there, 4 here\)")


def test_cache_resumes_after_a_kill(tmp_path, teacher_dir, chat_file, monkeypatch):
    extra = ("cache.top_k=8", "cache.shard_rows=100")
    make_cache(teacher_dir, chat_file, tmp_path / "whole", *extra)
    real_flush, calls = cache_mod.ShardWriter.flush, []

    def dies_after_two(*args):
        real_flush(*args)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for the kill, right after shard 2 was listed
    monkeypatch.setattr(cache_mod.ShardWriter, "flush", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        make_cache(teacher_dir, chat_file, tmp_path / "killed", *extra)
    monkeypatch.setattr(cache_mod.ShardWriter, "flush", real_flush)
    index = json.loads((tmp_path / "killed" / "index.json").read_text())
    assert len(index["shards"]) == 2 and not index["complete"]
    (tmp_path / "killed" / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # torn write
    with pytest.raises(UserError, match="incomplete"):
        TeacherCache(tmp_path / "killed")
    _, _, train, held = make_cache(teacher_dir, chat_file, tmp_path / "killed", *extra)
    a, b = TeacherCache(tmp_path / "whole"), TeacherCache(tmp_path / "killed")
    assert set(a.where) == set(b.where) and not list((tmp_path / "killed").glob("*.tmp"))
    for e in train + held:
        if positions(e):
            for x, y in zip(a.rows(e), b.rows(e)):
                assert torch.equal(x, y)


def test_training_from_cache_matches_the_live_teacher(tmp_path, teacher_dir, chat_file):
    """k = V, float32: a run from the cache ends with the same student as one with the live
    teacher, and the teacher is never loaded (its folder is gone by then)."""
    import shutil

    V = models.logits_width(models.load(str(teacher_dir)).model)
    t_copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, t_copy)
    # fp32 teacher on both sides: bf16 (teacher.dtype=auto on a CPU with native bf16) rounds the
    # full-logit forward and the lean path's chunked head differently.
    make_cache(t_copy, chat_file, tmp_path / "c", f"cache.top_k={V}", "cache.dtype=float32", "teacher.dtype=float32")
    # and an fp32 student: under bf16 autocast the two paths' logits are rounded differently too
    common = ["student.init=config", "student.hidden_size=32", "student.num_heads=4", "loss.temperature=2.0",
              "train.max_steps=3", "teacher.dtype=float32", "train.mixed_precision=no"]
    live = distill(load_config(None, tiny_overrides(t_copy, chat_file, tmp_path / "live") + common), progress=False)
    shutil.rmtree(t_copy)
    cached = distill(load_config(None, tiny_overrides(t_copy, chat_file, tmp_path / "cached") + common +
                                 ["teacher.kind=cache", f"teacher.cache={tmp_path / 'c'}"]), progress=False)
    wl = load_file(tmp_path / "live" / "final" / "model.safetensors")
    wc = load_file(tmp_path / "cached" / "final" / "model.safetensors")
    for k in wl:
        torch.testing.assert_close(wc[k], wl[k], rtol=1e-4, atol=1e-5, msg=k)
    assert cached["eval"]["teacher"]["perplexity"] == pytest.approx(live["eval"]["teacher"]["perplexity"], rel=1e-4)
    assert cached["eval"]["student after"]["agreement"] == live["eval"]["student after"]["agreement"]
    assert cached["eval"]["student after"]["kl_per_token"] is None  # T=2 cache: no T=1 KL to report


def test_two_processes_build_the_cache_of_one_and_a_killed_launch_continues(tmp_path, teacher_dir, chat_file):
    """`accelerate launch --num_processes 2 -m stillroom cache`: the processes split the batches and
    write their own shards; every sample's rows equal the one-process cache's bit for bit. A
    launch killed mid-build (process 1 after its second batch) keeps what was listed, and a rerun
    of the launch completes it, the same bit for bit."""
    from conftest import launch

    over = lambda d: [f"teacher.model={teacher_dir}", f"data.path={chat_file}", "data.seq_len=64",  # noqa: E731
                      f"cache.path={d}", "cache.batch_size=3", "cache.top_k=8", "cache.shard_rows=40",
                      "loss.temperature=2.0", "--no-progress"]
    r = run_cli("cache", *over(tmp_path / "one"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    launch(2, "-m", "stillroom", "cache", *over(tmp_path / "two"))
    r = launch(2, "-m", "stillroom", "cache", *over(tmp_path / "killed"), check=False,
               env={"STILLROOM_FAULT": "cache.batch:2", "STILLROOM_FAULT_RANK": "1"})
    assert r.returncode != 0
    killed = json.loads((tmp_path / "killed" / "index.json").read_text())
    assert not killed["complete"]
    launch(2, "-m", "stillroom", "cache", *over(tmp_path / "killed"))
    one = TeacherCache(tmp_path / "one")
    teacher = models.load(str(teacher_dir))
    train, held = load_data(cfg_for(teacher_dir, chat_file, tmp_path / "one"), teacher.tokenizer)
    for other in ("two", "killed"):
        c = TeacherCache(tmp_path / other)
        assert c.index["complete"] and set(c.where) == set(one.where), other
        assert any(s["file"].startswith("shard-p1-") for s in c.index["shards"]), other
        assert not list((tmp_path / other).glob("index.p*.json")), other
        for e in train + held:
            if positions(e):
                for x, y in zip(one.rows(e), c.rows(e)):
                    assert torch.equal(x, y), other
