"""The packed cache layout (teachers/packing.py): the Exp-Golomb id streams against bits written
by hand from the format's description, the log-prob grid's error bound and its exact top-1, and
a packed cache built from the tiny teacher reading back as its float32 cache does, to the grid."""
import math

import numpy as np
import pytest
import torch

from stillroom.teachers import packing
from stillroom.teachers.cache import TeacherCache, positions, summary
from stillroom.teachers.packing import TOP, Layout

from conftest import make_cache



def test_exp_golomb_bits_match_the_format_written_by_hand():
    # order 1: 0 -> w = 0 + 2 = 0b10: no zero, prefix "1", body "0"; 3 -> w = 3 + 2 = 0b101: prefix "01",
    # body "01"; the stream is every prefix, then every body: "1" "01" | "0" "01" -> 101001, padded to a byte
    assert packing._eg_encode(np.array([0, 3]), 1).tolist() == [0b10100100]
    # order 0: 5 -> w = 6 = 0b110: prefix "001", body "10"
    assert packing._eg_encode(np.array([5]), 0).tolist() == [0b00110000]
    assert packing._eg_decode(np.array([0b10100100], dtype=np.uint8), 2, 1).tolist() == [0, 3]


@pytest.mark.parametrize("r", [0, 1, 5, 6, 9])
def test_exp_golomb_round_trips_every_size_of_gap(r):
    rng = np.random.default_rng(r)
    v = np.concatenate([rng.integers(0, 2 ** 18, 500), rng.integers(0, 4, 500), [0, 2 ** r - 1, 2 ** r, 2 ** r + 1,
                                                                                  262_143]])
    assert packing._eg_decode(packing._eg_encode(v, r), len(v), r).tolist() == v.tolist()
    with pytest.raises(ValueError, match="ends early"):
        packing._eg_decode(packing._eg_encode(v, r)[:-8], len(v), r)


def _rows(R, k, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, vocab, generator=g) * 3
    lp = logits.log_softmax(-1)
    top = lp.topk(k)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    return top.indices, top.values.double(), tail, torch.randn(R, generator=g)


@pytest.mark.parametrize("vocab,k", [(1000, 16), (49152, 160), (262_144, 64), (50, 50)])
def test_packed_rows_read_back_to_the_grid_with_the_top1_exact(vocab, k):
    ids, lp, tail, label = _rows(37, k, vocab)
    layout = Layout("packed", vocab, k)
    got_ids, got_lp, got_tail, got_label = layout.decode(layout.encode(ids, lp, tail, label))
    assert got_ids.dtype == torch.int64 and got_lp.dtype == torch.float32
    assert torch.equal(got_ids[:, 0], ids[:, 0])                       # the most likely token, exactly
    assert (got_lp[:, 1:] < got_lp[:, :1]).all()                       # and no other entry ties it
    assert (got_lp[:, :-1] >= got_lp[:, 1:]).all()                     # highest first
    assert torch.equal(got_ids.sort(1).values, ids.sort(1).values)     # the same ids
    truth = torch.full((37, vocab), float("nan"), dtype=torch.float64).scatter(1, ids, lp)
    back = truth.gather(1, got_ids)                                    # the teacher's value of each entry read
    step = (lp.max(1).values - lp.min(1).values) / (TOP - 1)
    err = (got_lp.double() - back).abs()
    assert (err[:, 0] <= 1e-3 * back[:, 0].abs() + 1e-3).all()         # the top: float16 of the max
    assert (err[:, 1:] <= step[:, None] * 1.01 + 1e-3).all()           # others: half a step (a step below the top)
    assert (err[:, 1:] <= step[:, None] * 0.51 + 1e-3).float().mean() > 0.95
    torch.testing.assert_close(got_tail, tail.half().float())
    torch.testing.assert_close(got_label, label.half().float())


def test_rows_with_fewer_entries_keep_no_entry_as_minus_inf():
    ids = torch.tensor([[5, 9, 2, 7], [1, 3, 8, 6], [4, 0, 2, 1]])
    lp = torch.tensor([[-0.1, -2.5, -math.inf, -math.inf], [-0.7, -0.7, -3.0, -9.0],
                       [-math.inf] * 4], dtype=torch.float64)
    layout = Layout("packed", 10, 4)
    got_ids, got_lp, _, _ = layout.decode(layout.encode(ids, lp, torch.zeros(3), torch.zeros(3)))
    assert got_ids[0, :2].tolist() == [5, 9] and torch.isinf(got_lp[0, 2:]).all()
    assert got_ids[1, 0] == 1 and got_lp[1, 0] > got_lp[1, 1]          # a tie: the first listed stays first
    assert torch.isinf(got_lp[2]).all() and sorted(got_ids[2].tolist()) == [0, 1, 2, 4]


def test_a_packed_cache_reads_back_as_the_float32_cache_to_the_grid(tmp_path, teacher_dir, chat_file):
    _, _, train, held = make_cache(teacher_dir, chat_file, tmp_path / "f32", "cache.top_k=16", "cache.dtype=float32",
                                   "cache.shard_rows=150")
    make_cache(teacher_dir, chat_file, tmp_path / "p", "cache.top_k=16", "cache.dtype=packed", "cache.shard_rows=150")
    a, b = TeacherCache(tmp_path / "f32"), TeacherCache(tmp_path / "p")
    assert len(b.index["shards"]) > 1 and max(len(s["samples"]) for s in b.index["shards"]) > 3
    checked = 0
    for e in train + held:
        if not positions(e):
            continue
        ids, lp, tail, label = a.rows(e)
        pids, plp, ptail, plabel = b.rows(e)
        assert torch.equal(pids[:, 0], ids[:, 0].long())
        assert torch.equal(pids.sort(1).values, ids.long().sort(1).values)
        step = (lp.max(1).values - lp.min(1).values) / (TOP - 1)
        order = ids.long().argsort(1)
        err = (plp.gather(1, pids.argsort(1)) - lp.gather(1, order)).abs()
        assert (err <= step[:, None] * 1.01 + 1e-3).all()
        torch.testing.assert_close(ptail, tail, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(plabel, label, rtol=1e-3, atol=1e-3)
        checked += 1
    assert checked == len(a.where)
    assert summary(tmp_path / "p")["bytes_per_token"] < summary(tmp_path / "f32")["bytes_per_token"]


@pytest.mark.parametrize("fmt", ["vllm", "distillkit"])
def test_a_packed_cache_exported_and_imported_packed_again_is_the_same(tmp_path, teacher_dir, chat_file, fmt):
    """Its grid values land on the same grid again: packed -> a capture -> packed reads back equal."""
    from conftest import run_cli, tiny_overrides

    base = tiny_overrides(teacher_dir, chat_file, tmp_path / "unused") + [
        "loss.temperature=1.0", "cache.dtype=packed", "cache.top_k=16", "--no-progress"]
    assert run_cli("cache", *base, f"cache.path={tmp_path / 'own'}").returncode == 0
    capture = tmp_path / ("capture" if fmt == "distillkit" else "capture.jsonl")
    r = run_cli("cache", *base, "teacher.kind=cache", f"teacher.cache={tmp_path / 'own'}", f"--export-{fmt}", capture)
    assert r.returncode == 0, r.stderr
    r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={capture}", "data.seq_len=64",
                f"cache.source={fmt}", "cache.dtype=packed", "cache.top_k=16", f"cache.path={tmp_path / 'back'}",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    a, b = TeacherCache(tmp_path / "own"), TeacherCache(tmp_path / "back")
    assert a.where.keys() == b.where.keys() and len(a.where) > 10
    for sid in a.where:
        ra, rb = a.read(sid), b.read(sid)
        assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1]), sid
