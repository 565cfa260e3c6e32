"""`stillroom export`: GGUF files read back by transformers' GGUF loader (and llama.cpp where
llama-cpp-python is installed: `make test-api`) give the PyTorch model's logits within a stated
tolerance per type."""
import json

import pytest

from stillroom.deploy.export import check, write_gguf
from stillroom.models import core as models

from conftest import run_cli

# Stated tolerances, KL(PyTorch || file) per token on the check text, and top-1 agreement.
TOL = {"f16": (1e-4, 0.98), "q8_0": (0.02, 0.8)}   # f16: a near-tie may flip


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_export_round_trip_tiny(tmp_path, teacher_dir, qtype):
    out = tmp_path / f"s-{qtype}.gguf"
    r = run_cli("export", teacher_dir, "--type", qtype, "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    c = res["check"]["transformers"]
    kl, agree = TOL[qtype]
    assert c["kl_per_token"] < kl and c["top1_agreement"] >= agree, c
    assert json.loads(out.with_name(out.name + ".check.json").read_text()) == res
    assert not list(tmp_path.glob("*.tmp"))


def test_sizes_shrink_with_the_type(tmp_path, teacher_dir):
    m = models.load(str(teacher_dir))
    sizes = {q: write_gguf(m.model, m.tokenizer, tmp_path / f"{q}.gguf", q).stat().st_size
             for q in ("f16", "q8_0", "q4_0")}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]


def test_export_refuses_what_it_cannot_write(tmp_path, teacher_dir):
    r = run_cli("export", tmp_path / "nothing", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", teacher_dir, "--out", tmp_path / "x.bin")
    assert r.returncode == 2 and ".gguf" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_runs_the_exported_file(tmp_path, teacher_dir):
    pytest.importorskip("llama_cpp")
    m = models.load(str(teacher_dir))
    f = write_gguf(m.model, m.tokenizer, tmp_path / "s.gguf", "f16")
    c = check(m.model, m.tokenizer, f)["llama_cpp"]
    assert c["same_tokens"]                                   # the file's tokenizer splits text as HF does
    assert c["kl_per_token"] < 1e-3 and c["top1_agreement"] >= 0.98, c


@pytest.mark.real
def test_real_student_quantized_types(tmp_path):
    """A 2-layer student cut from the bundled SmolLM2 (its real embeddings and vocabulary)."""
    smol = models.load("smollm2-135m")
    student, _ = models.student_from_teacher(smol.model, num_layers=2)
    student.eval()
    for qtype, (kl, agree) in {"q8_0": (0.01, 0.9), "q4_0": (0.5, 0.6)}.items():
        f = write_gguf(student, smol.tokenizer, tmp_path / f"{qtype}.gguf", qtype)
        c = check(student, smol.tokenizer, f)["transformers"]
        assert c["kl_per_token"] < kl and c["top1_agreement"] >= agree, (qtype, c)
