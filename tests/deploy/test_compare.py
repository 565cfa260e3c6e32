"""`stillroom compare`: every number comes from running the models (checked against independent
computations where one exists)."""
import json

import pytest
import torch

from stillroom.config import DataConfig
from stillroom.data.examples import build_examples
from stillroom.eval import evaluate
from stillroom.models import core as models

from conftest import CORPUS, make_model, run_cli, save


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("cmp")
    save(make_model(tok, layers=2, init_range=0.3, seed=3), tok, d / "student")
    (d / "held.txt").write_text("\n".join(CORPUS))
    return d


def test_compare_numbers_come_from_the_models(setup, teacher_dir):
    d = setup
    try:
        import llama_cpp  # noqa: F401
        formats = ["f16", "q8_0"]
    except ImportError:
        formats = []
    r = run_cli("compare", teacher_dir, d / "student", "--data", d / "held.txt", "--formats", *formats,
                "--gguf-dir", d / "gguf", "--prefill-tokens", "64", "--new-tokens", "8", "--rounds", "2",
                "--max-examples", "6", "--json", "--no-progress", "--draft", "--draft-tokens", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    cols = res["columns"]
    assert list(cols) == ["teacher", "student"] + [f"student {f}" for f in formats]
    # quality: the same numbers as the evaluation computes on the same examples
    tok = models.load(str(teacher_dir)).tokenizer
    ex = build_examples(str(d / "held.txt"), tok, DataConfig(path=str(d / "held.txt"), seq_len=256))[0][:6]
    ref = evaluate.score(models.load(str(d / "student")).model, models.load(str(teacher_dir)).model, ex,
                           tok.pad_token_id, batch_size=1)
    s = cols["student"]
    assert s["perplexity"] == pytest.approx(ref["student_perplexity"], rel=1e-4)
    assert s["agreement"] == pytest.approx(ref["agreement"]) and s["kl_per_token"] == pytest.approx(ref["kl_per_token"], rel=1e-4)
    assert cols["teacher"]["perplexity"] == pytest.approx(ref["teacher_perplexity"], rel=1e-4)
    assert s["params"] == models.num_params(models.load(str(d / "student")).model)
    assert s["size_mb"] * 2**20 == pytest.approx((d / "student" / "model.safetensors").stat().st_size, rel=1e-6)
    for name, c in cols.items():
        assert c["prefill_tokens_per_s"] > 0 and c["decode_tokens_per_s"] > 0 and c["latency_s"] > 0
        assert c["peak_mb"] >= 0
        on_gpu = torch.cuda.is_available() and " " not in name   # (GGUF columns, "student q8_0", run on the CPU)
        assert c["device_peak_mb"] > 0 if on_gpu else c["device_peak_mb"] is None
    from stillroom.deploy.compare import table
    assert ("peak GPU memory MB" in table(cols)) == torch.cuda.is_available()   # (the row only where a GPU ran)
    assert len(res["generations"]["student"]) == len(res["generations"]["prompts"])
    # the student as the teacher's draft model: the same acceptance as draft.py's own check, only on
    # the student's own column (not the teacher's, not a GGUF file's)
    from stillroom.deploy.compare import DEFAULT_PROMPTS
    from stillroom.eval import draft

    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in DEFAULT_PROMPTS]
    ref = draft.draft_check(models.load(str(teacher_dir)).model, models.load(str(d / "student")).model, ids, 8,
                            tok.pad_token_id, 3)
    assert s["draft_acceptance"] == pytest.approx(ref["acceptance_rate"]) and 0 <= s["draft_acceptance"] <= 1
    assert s["draft_accepted_per_step"] == pytest.approx(ref["accepted_per_step"])
    assert s["draft_identical"] == f"{ref['identical']}/3" and s["draft_speedup"] > 0
    assert all("draft_acceptance" not in c for k, c in cols.items() if k != "student")
    if formats:
        f16 = cols["student f16"]
        assert f16["perplexity"] == pytest.approx(s["perplexity"], rel=1e-2)   # llama.cpp runs the f16 file
        assert f16["size_mb"] * 2**20 == (d / "gguf" / "student-f16.gguf").stat().st_size
        assert cols["student q8_0"]["size_mb"] < f16["size_mb"]


def test_compare_refuses_bad_input(setup, teacher_dir, tmp_path):
    d = setup
    r = run_cli("compare", teacher_dir, d / "student", "--data", tmp_path / "none.txt")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("compare", teacher_dir, d / "student", "--data", d / "held.txt", "--formats", "q3")
    assert r.returncode == 2 and "q3" in r.stderr
