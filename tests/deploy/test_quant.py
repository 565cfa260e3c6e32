"""Quantization-aware distillation: the fake quantizers are llama.cpp's, and a QAT student exported
to that GGUF type computes what was trained."""
import numpy as np
import pytest
import torch

from stillroom.recipes import load_config
from stillroom.deploy.export import check, write_gguf
from stillroom.deploy.quant import FakeQuant, fake_quant
from stillroom.models import core as models
from stillroom.run.distill import distill

from conftest import tiny_overrides


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_fake_quant_is_gguf_bit_for_bit(qtype):
    import gguf
    t = getattr(gguf.GGMLQuantizationType, qtype.upper())
    x = (np.random.default_rng(0).standard_normal((8, 96)) * 0.1).astype(np.float32)
    x[0, :32] = 0.0                                         # an all-zero block
    ref = gguf.quants.dequantize(gguf.quants.quantize(x, t), t)
    assert np.array_equal(fake_quant(torch.from_numpy(x), qtype).numpy(), ref)
    # and it is idempotent: quantized values survive another round (what export relies on)
    once = fake_quant(torch.from_numpy(x), qtype)
    assert torch.equal(fake_quant(once, qtype), once)


def test_straight_through_gradient():
    w = torch.randn(4, 32, requires_grad=True)
    y = FakeQuant("q4_0")(w)
    assert torch.equal(y.detach(), fake_quant(w, "q4_0"))
    (y * torch.arange(128.0).reshape(4, 32)).sum().backward()
    assert torch.equal(w.grad, torch.arange(128.0).reshape(4, 32))


def test_qat_student_exports_to_what_it_trained(tmp_path, teacher_dir, chat_file):
    over = tiny_overrides(teacher_dir, chat_file, tmp_path / "qat") + ["train.qat=q4_0", "train.save_every=2"]
    distill(load_config(None, over), progress=False)
    plain = tiny_overrides(teacher_dir, chat_file, tmp_path / "plain")
    distill(load_config(None, plain), progress=False)
    res = {}
    for name in ("qat", "plain"):
        m = models.load(str(tmp_path / name / "final"))
        blk = m.model.model.layers[0].mlp.down_proj.weight
        if name == "qat":                                   # final/ holds quantized values already
            assert torch.equal(fake_quant(blk, "q4_0"), blk)
        f = write_gguf(m.model, m.tokenizer, tmp_path / f"{name}.gguf", "q4_0")
        res[name] = check(m.model, m.tokenizer, f)["transformers"]["kl_per_token"]
    # the QAT file differs from its model only by the embeddings' Q8_0; the plain one by Q4_0 everywhere
    assert res["qat"] < res["plain"] / 5, res


def test_qat_resumes_exactly(tmp_path, teacher_dir, chat_file):
    import shutil

    from safetensors.torch import load_file
    extra = ["train.qat=q8_0", "train.max_steps=4", "train.save_every=2"]
    distill(load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "full") + extra), progress=False)
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000002", tmp_path / "cut" / "checkpoints" / "step_0000002")
    distill(load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "cut") + extra), resume=True,
            progress=False)
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
