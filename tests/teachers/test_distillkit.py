"""DistillKit / open-instruct captures (teachers/distillkit.py): rows built here byte by byte from
the format's description (independent of stillroom's writer) decode to the values they were built
from, in the lossy layouts too (exact values, polynomial coefficients, quantized residual bins,
delta encoding, bf16, 1-bit bins, normalized t); a capture imports to a cache a student trains
from; what it cannot read is one line. The lossless round trip through stillroom's own cache is
test_served.py's (test_a_cache_exported_as_a_capture_reads_back_the_same)."""
import json
import math
import struct

import numpy as np
import pytest
import yaml

from conftest import assert_user_error, run_cli

from stillroom.teachers import distillkit


def bits_to_bytes(values, bits):
    """Most significant bit first, zero-padded to whole bytes (written out by hand)."""
    s = "".join(format(v, f"0{bits}b") for v in values)
    s += "0" * (-len(s) % 8)
    return [int(s[i:i + 8], 2) for i in range(0, len(s), 8)]


def bf16(x):
    return struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0])[2:]


CASES = {
    # exact [-0.5, -1.25]; fit -2 - 0.5 t at t = 0..3; a 4-bit bin of 3 residuals (q - 8) * 0.25
    "plain": ({"exact_dtype": "float32", "polynomial_terms": [0, 1], "delta_encoding": False,
               "residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 3}]},
              struct.pack("<ff", -0.5, -1.25) + struct.pack("<ff", -2.0, -0.5) + struct.pack("<e", 0.25)
              + bytes(bits_to_bytes([9, 6, 8], 4)),
              [-0.5, -1.25, -2.0 + 0.25, -2.5 - 0.5, -3.0, -3.5]),
    # the same bytes read as deltas: summed back
    "delta": ({"exact_dtype": "float32", "polynomial_terms": [0, 1], "delta_encoding": True,
               "residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 3}]},
              struct.pack("<ff", -0.5, -1.25) + struct.pack("<ff", -2.0, -0.5) + struct.pack("<e", 0.25)
              + bytes(bits_to_bytes([9, 6, 8], 4)),
              list(np.cumsum([-0.5, -1.25, -1.75, -3.0, -3.0, -3.5]))),
    # bf16 exact values, no polynomial, a 1-bit bin ((2q - 1) * scale) and a 2-bit one (q - 2) * scale
    "bits": ({"exact_dtype": "bfloat16", "polynomial_terms": None, "delta_encoding": False,
              "residual_bins": [{"scale_dtype": "float32", "element_bits": 1, "num_elements": 2},
                                {"scale_dtype": "float16", "element_bits": 2, "num_elements": 2}]},
             bf16(-0.5) + bf16(-1.25) + struct.pack("<f", 0.75) + bytes(bits_to_bytes([1, 0], 1))
             + struct.pack("<e", 1.5) + bytes(bits_to_bytes([0, 3], 2)),
             [-0.5, -1.25, 0.75, -0.75, -3.0, 1.5]),
    # sqrt and t**2 terms over t spread on [0, 1] (normalize_t), float64 coefficients, no bins
    "terms": ({"exact_dtype": "float32", "polynomial_terms": ["sqrt", 2], "term_dtype": "float64",
               "normalize_t": True, "delta_encoding": False, "residual_bins": []},
              struct.pack("<ff", -0.5, -1.25) + struct.pack("<dd", -1.0, -2.0),
              [-0.5, -1.25] + [-math.sqrt(t) - 2 * t * t for t in (0, 1 / 3, 2 / 3, 1)]),
}


@pytest.mark.parametrize("case", CASES)
def test_rows_built_from_the_format_decode_to_their_values(case):
    extra, row, want = CASES[case]
    cfg = {"d": 300, "k": 6, "exact_k": 2, "term_dtype": "float32", "error_diffusion": False, "normalize_t": False,
           **extra}
    got = distillkit.decode_logprobs(np.array([list(row)] * 2, dtype=np.uint8), cfg)
    assert got.shape == (2, 6)
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-12)
    ids = [5, 299, 0, 17, 256, 1]   # 9 bits each (d = 300)
    packed = np.array([bits_to_bytes(ids, 9)], dtype=np.uint8)
    assert distillkit.index_bits(300) == 9 and distillkit.unpack(packed, 9, 6).tolist() == [ids]
    assert distillkit.pack(np.array([ids]), 9).tolist() == packed.tolist()


def write_capture(folder, rows, cfg):
    """A capture as DistillKit's sampler writes it: data_0.parquet and compression_config.yaml."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.uint64())),
                        pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
                        pa.field("text", pa.string())])   # (open-instruct's extra column)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "data_0.parquet")
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(cfg))


def lossy_capture(folder, teacher_dir, n_rows=12, length=20, k=8, first_entry=False):
    """The tiny teacher's top-k over random sequences, in a lossy layout (4 exact fp16 values, a
    3-term fit, one 8-bit residual bin), with or without vLLM's empty first entry."""
    import torch

    from stillroom.models import core as models

    teacher = models.load(str(teacher_dir)).model
    d = teacher.config.vocab_size
    cfg = {"d": d, "k": k, "exact_k": 4, "exact_dtype": "float16", "polynomial_terms": [0, 1, 2],
           "term_dtype": "float32", "residual_bins": [{"scale_dtype": "float16", "element_bits": 8, "num_elements": 4}],
           "delta_encoding": False, "error_diffusion": False, "normalize_t": False}
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n_rows):
        ids = torch.randint(0, d, (1, length), generator=g)
        with torch.no_grad():
            top = teacher(input_ids=ids).logits[0, :-1].float().log_softmax(-1).topk(k)
        lp, tk = top.values.double().numpy(), top.indices.numpy()
        exact = np.ascontiguousarray(lp[:, :4]).astype("<f2")
        t = np.arange(k - 4, dtype=np.float64)
        X = np.stack([t ** 0, t, t ** 2], -1)
        coef = np.ascontiguousarray(np.linalg.lstsq(X, lp[:, 4:].T, rcond=None)[0].T).astype("<f4")
        res = lp[:, 4:] - coef.astype(np.float64) @ X.T
        scale = (np.abs(res).max(-1, keepdims=True) / 128).astype("<f2")
        s64 = np.where(scale == 0, 1, scale).astype(np.float64)
        q = (np.clip(np.round(res / s64), -128, 127) + 128).astype(np.int64)
        packed = np.concatenate([exact.view(np.uint8), coef.view(np.uint8), scale.view(np.uint8),
                                 q.astype(np.uint8)], -1)
        idx = np.array([bits_to_bytes(r.tolist(), distillkit.index_bits(d)) for r in tk], dtype=np.uint8)
        if first_entry:   # vLLM's entry 0 kept: an empty row in front (-inf values, a fit to them NaN, ids 0)
            empty = np.concatenate([np.full((1, 4), -np.inf).astype("<f2").view(np.uint8),
                                    np.full((1, 3), np.nan).astype("<f4").view(np.uint8), np.zeros((1, 2 + 4), np.uint8)], -1)
            packed = np.concatenate([empty, packed])
            idx = np.concatenate([np.zeros((1, idx.shape[1]), np.uint8), idx])
        rows.append({"input_ids": ids[0].tolist(), "compressed_logprobs": packed.tolist(),
                     "bytepacked_indices": idx.tolist(), "text": "(unused)"})
    write_capture(folder, rows, cfg)
    return rows


@pytest.mark.parametrize("first_entry", [False, True], ids=["L-1 rows", "L rows"])
def test_a_lossy_capture_imports_and_trains_a_student(tmp_path, teacher_dir, first_entry):
    """cache.source=distillkit over a lossy capture of the tiny teacher: the cache holds, per
    position, the teacher's top-k ids exactly and its log-probs to the format's rounding (fp16
    exact values, a fitted tail with 8-bit residuals), whichever first-row convention; the
    sequences are the cache's data (data.jsonl), and a student distills from it."""
    import torch

    from stillroom.data.examples import Example
    from stillroom.teachers.cache import TeacherCache

    cap = tmp_path / "capture"
    rows = lossy_capture(cap, teacher_dir, first_entry=first_entry)
    r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={cap}", "cache.source=distillkit",
                "cache.top_k=8", "cache.dtype=float32", f"cache.path={tmp_path / 'c'}", "data.seq_len=64",
                "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    cache = TeacherCache(tmp_path / "c")
    assert cache.index["data"]["path"] == str(tmp_path / "c" / "data.jsonl")
    data = [json.loads(x) for x in (tmp_path / "c" / "data.jsonl").read_text().splitlines()]
    assert [d["input_ids"] for d in data] == [r["input_ids"] for r in rows]
    from stillroom.models import core as models
    teacher = models.load(str(teacher_dir)).model
    for d in data[:3]:
        e = Example(d["input_ids"], d["labels"])
        ids, logp, tail, _ = cache.rows(e)
        with torch.no_grad():
            want = teacher(input_ids=torch.tensor([d["input_ids"]])).logits[0, :-1].float().log_softmax(-1).topk(8)
        assert torch.equal(ids.long(), want.indices)
        torch.testing.assert_close(logp, want.values, atol=0.03, rtol=0.01)   # fp16 and 8-bit residuals
        torch.testing.assert_close(tail.exp(), 1 - want.values.exp().sum(-1), atol=0.02, rtol=0)
    r = run_cli("distill", f"teacher.model={teacher_dir}", "teacher.kind=cache", f"teacher.cache={tmp_path / 'c'}",
                f"train.output_dir={tmp_path / 'run'}", "student.num_layers=2", "data.seq_len=64", "train.max_steps=3",
                "train.batch_size=4", "eval.gen_tokens=2", "eval.gen_prompts=1", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["no config", "legacy", "no column", "short row", "not parquet", "no files"])
def test_a_capture_it_cannot_read_is_one_line(tmp_path, teacher_dir, case):
    cap = tmp_path / "capture"
    rows = lossy_capture(cap, teacher_dir, n_rows=2)
    cfg = yaml.safe_load((cap / "compression_config.yaml").read_text())
    why = {"no config": "no compression_config.yaml", "legacy": "legacy logit compression",
           "no column": "missing the columns bytepacked_indices, compressed_logprobs", "short row": "shorter than compression_config.yaml",
           "not parquet": "not a parquet file", "no files": "no data_\\*.parquet"}[case]
    if case == "no config":
        (cap / "compression_config.yaml").unlink()
    elif case == "legacy":
        (cap / "compression_config.yaml").write_text(yaml.safe_dump({"legacy_logit_compression": {"k": 8}}))
    elif case == "no column":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"input_ids": [r["input_ids"] for r in rows]}), cap / "data_0.parquet")
    elif case == "short row":
        cap2 = tmp_path / "c2"
        for r in rows:
            r["compressed_logprobs"] = [x[:10] for x in r["compressed_logprobs"]]
        write_capture(cap2, rows, cfg)
        cap = cap2
    elif case == "not parquet":
        (cap / "data_0.parquet").write_text("not parquet")
    else:
        (cap / "data_0.parquet").unlink()
    r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={cap}", "cache.source=distillkit",
                "cache.top_k=8", f"cache.path={tmp_path / 'c'}", "data.seq_len=64", "--no-progress")
    assert_user_error(r, why)
    assert not (tmp_path / "c").exists() or case in ("no column", "short row", "not parquet")


def test_a_cache_exports_in_a_compressed_layout(tmp_path, teacher_dir, chat_file):
    """--export-distillkit DIR --distillkit-layout YAML: the cache compressed as DistillKit's budget
    pick says (k 8 of the cache's 16, 1 exact bf16 value, a fit of 1, t, sqrt t); its rows are that
    layout's size, and read back they give the cache's top-8 ids exactly and its log-probs to the
    fit's error; positions without a loss still read as no targets (the same examples come back)."""
    from conftest import tiny_overrides
    from stillroom.teachers.cache import TeacherCache

    base = tiny_overrides(teacher_dir, chat_file, tmp_path / "unused") + [
        "loss.temperature=1.0", "cache.dtype=float32", "cache.top_k=16", "teacher.dtype=float32"]
    assert run_cli("cache", *base, f"cache.path={tmp_path / 'own'}").returncode == 0
    layout = {"d": 320, "k": 8, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
              "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False,
              "normalize_t": False}
    (tmp_path / "budget.yaml").write_text(yaml.safe_dump(layout))
    r = run_cli("cache", *base, "teacher.kind=cache", f"teacher.cache={tmp_path / 'own'}", "--export-distillkit",
                tmp_path / "dk", "--distillkit-layout", tmp_path / "budget.yaml")
    assert r.returncode == 0 and "compressed as" in r.stdout, r.stderr[-2000:]
    r = run_cli("cache", *base, "teacher.kind=cache", f"teacher.cache={tmp_path / 'own'}", "--export-distillkit",
                tmp_path / "dk2", "--distillkit-layout", tmp_path / "none.yaml")
    assert_user_error(r, "--distillkit-layout .*none.yaml: no such file")
    assert not (tmp_path / "dk2").exists()
    import pyarrow.parquet as pq
    row = pq.read_table(tmp_path / "dk" / "data_0.parquet").slice(0, 1).to_pylist()[0]
    assert {len(x) for x in row["compressed_logprobs"]} == {2 + 3 * 4}   # bf16 + 3 fp32 coefficients
    assert {len(x) for x in row["bytepacked_indices"]} == {-(-8 * 9 // 8)}   # 8 ids of 9 bits (d 320)
    r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={tmp_path / 'dk'}", "data.seq_len=64",
                "cache.source=distillkit", "cache.dtype=float32", "cache.top_k=8", f"cache.path={tmp_path / 'back'}",
                "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    own, back = TeacherCache(tmp_path / "own"), TeacherCache(tmp_path / "back")
    own_ids = {s for sh in own.index["shards"] for s, _ in sh["samples"]}
    back_ids = {s for sh in back.index["shards"] for s, _ in sh["samples"]}
    assert own_ids == back_ids and len(own_ids) > 10
    from stillroom.data.examples import Example
    for d in [json.loads(x) for x in (tmp_path / "back" / "data.jsonl").read_text().splitlines()][:5]:
        e = Example(d["input_ids"], d["labels"])
        (i0, l0, _, _), (i1, l1, _, _) = own.rows(e), back.rows(e)
        # what the layout keeps of the cache's top-8, through the format's own encode and decode
        kept = distillkit.decode_logprobs(distillkit.encode_logprobs(l0[:, :8].double().numpy(), layout), layout)
        for r in range(len(i0)):   # the same 8 ids (a fitted tail may reorder close ones), those values
            want = dict(zip(i0[r, :8].tolist(), kept[r].tolist()))
            got = dict(zip(i1[r].tolist(), l1[r].tolist()))
            assert want.keys() == got.keys()
            assert max(abs(want[t] - got[t]) for t in want) < 1e-5
            assert abs(got[int(i0[r, 0])] - float(l0[r, 0])) < 0.02   # the exact one, in bf16


@pytest.mark.parametrize("case", CASES)
def test_the_encoder_gives_back_what_each_layout_can_hold(case):
    """encode_logprobs, read by decode_logprobs: a row the layout holds exactly (exact values it can
    store, the rest on its polynomial, residuals on its bins' grid) comes back as it was; a row of
    -inf (no targets) comes back listing nothing."""
    extra = CASES[case][0]
    values = {"plain": [-0.5, -1.25, -2.0, -2.5, -3.0, -3.5],   # the rest on the line, residuals 0
              "delta": list(np.cumsum([-0.5, -1.25, -2.0, -2.5, -3.0, -3.5])),   # its deltas so
              "bits": [-0.5, -1.25, 0.75, -0.75, -3.0, 1.5],    # +-mean on the 1-bit bin, the 2-bit grid
              "terms": CASES["terms"][2]}[case]
    cfg = {"d": 300, "k": 6, "exact_k": 2, "term_dtype": "float32", "error_diffusion": False, "normalize_t": False,
           **extra}
    x = np.array([values, [-np.inf] * 6])
    back = distillkit.decode_logprobs(distillkit.encode_logprobs(x, cfg), cfg)
    np.testing.assert_allclose(back[0], values, rtol=0, atol=1e-6)
    assert not np.isfinite(back[1]).any()
