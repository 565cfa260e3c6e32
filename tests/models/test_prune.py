"""Width pruning: a smaller, loadable HF model whose outputs change only where expected."""
import json

import pytest
import torch

from stillroom.recipes import load_config
from stillroom.errors import UserError
from stillroom.models.prune import importance, prune_width
from stillroom.run.distill import distill

from conftest import make_model, tiny_overrides


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    return make_model(tok, layers=2, hidden=32, heads=4, kv=2, init_range=0.3).eval()


def _batches(tok):
    enc = tok(["The cat sat on the mat and looked at the moon.", "Rain falls, rivers run."],
              return_tensors="pt", padding=True)
    return [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}]


def _logits(m, tok):
    b = _batches(tok)[0]
    with torch.no_grad():
        return m(**b).logits


def test_keeping_everything_changes_nothing(model, tok):
    imp = importance(model, _batches(tok))
    small, _ = prune_width(model, imp, heads=4, intermediate=model.config.intermediate_size)
    torch.testing.assert_close(_logits(small.eval(), tok), _logits(model, tok))


def test_dead_channels_and_heads_are_the_ones_pruned_and_nothing_else_moves(model, tok):
    I, d = model.config.intermediate_size, 8
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:10] = 0.0        # silu(0) = 0: channels 0..9 carry nothing
            layer.self_attn.o_proj.weight[:, d:2 * d] = 0.0   # head 1 (group 0) reaches nothing
            layer.self_attn.o_proj.weight[:, 3 * d:4 * d] = 0.0  # head 3 (group 1) reaches nothing
    imp = importance(model, _batches(tok))
    assert all(float(s["mlp"][:10].max()) == 0.0 and float(s["mlp"][10:].min()) > 0 for s in imp)
    # the head scores measure the heads' outputs; a head whose output the o projection drops is
    # still "active" there, so rank it last by hand to check the copy of the kept heads' weights
    for s in imp:
        s["heads"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    small, keep = prune_width(model, imp, heads=2, intermediate=I - 10)
    assert keep[0]["heads"] == [0, 2]
    assert small.config.num_attention_heads == 2 and small.config.num_key_value_heads == 2
    assert small.config.intermediate_size == I - 10 and small.config.head_dim == d
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_logits(small.eval(), tok), _logits(model, tok), rtol=1e-5, atol=1e-5)
    # and pruning live channels does change the outputs
    live, _ = prune_width(model, imp, heads=4, intermediate=I - 20)
    assert not torch.allclose(_logits(live.eval(), tok), _logits(model, tok), atol=1e-4)


def test_pruned_model_saves_and_loads(model, tok, tmp_path):
    from transformers import AutoModelForCausalLM
    small, _ = prune_width(model, importance(model, _batches(tok)), heads=2, intermediate=16)
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(back, tok), _logits(small.eval(), tok))


def test_bad_widths_are_refused(model, tok):
    imp = importance(model, _batches(tok))
    with pytest.raises(UserError, match="multiple of the 2 key/value heads"):
        prune_width(model, imp, heads=3)
    with pytest.raises(UserError, match="prune_intermediate"):
        prune_width(model, imp, intermediate=10_000)


def test_depth_and_width_pruning_then_distillation(tmp_path, teacher_dir, chat_file):
    cfg = load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "p") +
                      ["student.prune_heads=2", "student.prune_intermediate=24", "student.calibration_examples=8"])
    m = distill(cfg, progress=False)
    conf = json.loads((tmp_path / "p" / "final" / "config.json").read_text())
    assert (conf["num_hidden_layers"], conf["num_attention_heads"], conf["intermediate_size"]) == (2, 2, 24)
    assert m["eval"]["student after"]["perplexity"] < m["eval"]["student before"]["perplexity"]
    bad = load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "bad") + ["student.prune_heads=3"])
    with pytest.raises(UserError, match="prune_heads"):
        distill(bad, progress=False)
    assert not (tmp_path / "bad").exists()
