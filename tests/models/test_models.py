import pytest
import torch

from stillroom.config import StudentConfig
from stillroom.errors import UserError
from stillroom.models import core as models

from stillroom.models import running
from conftest import make_model, make_tokenizer


def test_student_keeping_all_layers_reproduces_teacher_logits(teacher_dir):
    t = models.load(str(teacher_dir))
    student, keep = models.student_from_teacher(t.model, num_layers=4)
    assert keep == [0, 1, 2, 3]
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, t.model(x).logits, rtol=0, atol=0)


def test_student_from_teacher_copies_the_chosen_layers(teacher_dir):
    t = models.load(str(teacher_dir))
    student, keep = models.student_from_teacher(t.model, layers=[0, 3])
    assert student.config.num_hidden_layers == 2
    ts, ss = t.model.state_dict(), student.state_dict()
    for k in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(ss[f"model.layers.1.{k}"], ts[f"model.layers.3.{k}"])
        assert torch.equal(ss[f"model.layers.0.{k}"], ts[f"model.layers.0.{k}"])
    assert torch.equal(ss["model.embed_tokens.weight"], ts["model.embed_tokens.weight"])
    # The copy is independent: training the student must not touch the teacher.
    assert ss["model.embed_tokens.weight"].data_ptr() != ts["model.embed_tokens.weight"].data_ptr()
    # Attention layers are renumbered so the KV cache works in generation.
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    out = student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_spread_layers_keeps_first_and_last():
    assert models.spread_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert models.spread_layers(4, 2) == [0, 3]
    assert models.spread_layers(5, 1) == [0]
    with pytest.raises(UserError, match="choose 1..4"):
        models.spread_layers(4, 5)


def test_bad_layer_lists_are_user_errors(teacher_dir):
    t = models.load(str(teacher_dir))
    for bad in ([0, 7], [2, 1], [1, 1]):
        with pytest.raises(UserError, match="student.layers"):
            models.student_from_teacher(t.model, layers=bad)


def test_student_from_small_config(teacher_dir):
    t = models.load(str(teacher_dir))
    s = models.student_from_config(t.model, StudentConfig(init="config", hidden_size=16, num_layers=1,
                                                          num_heads=2))
    assert s.config.hidden_size == 16 and s.config.num_hidden_layers == 1
    assert s.config.vocab_size == t.model.config.vocab_size
    assert s(torch.tensor([[1, 2]])).logits.shape[-1] == t.model.config.vocab_size
    with pytest.raises(UserError, match="divisible"):
        models.student_from_config(t.model, StudentConfig(init="config", hidden_size=18, num_layers=1,
                                                          num_heads=4))


def test_teacher_is_frozen(teacher_dir):
    t = models.load(str(teacher_dir))
    assert not t.model.training
    assert not any(p.requires_grad for p in t.model.parameters())


def test_vocab_check(tmp_path, tok):
    teacher = make_model(tok)
    same = make_model(tok, layers=1)
    assert models.check_vocab(teacher, tok, same, tok) == (len(tok), None)
    # Padded logits in the same family: sliced to the shared width, and the note says so.
    padded = make_model(tok, layers=1, vocab=len(tok) + 16)
    width, note = models.check_vocab(teacher, tok, padded, tok)
    assert width == len(tok) and "sliced" in note and str(len(tok) + 16) in note
    # A different tokenizer is refused with both sizes named.
    other = make_tokenizer()
    other.add_tokens(["<extra_a>", "<extra_b>"])
    with pytest.raises(UserError, match=rf"teacher vocab {len(tok)}, student vocab {len(other)}"):
        models.check_vocab(teacher, tok, same, other)
    # Logits narrower than the tokenizer cannot be aligned.
    narrow = make_model(tok, layers=1, vocab=len(tok) - 10)
    with pytest.raises(UserError, match="does not cover"):
        models.check_vocab(teacher, tok, narrow, tok)


def test_model_spec_errors(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        models.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="model path not found"):
        models.load("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        models.load(str(tmp_path / "empty"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Hugging Face Hub"):
        models.load("someone/not-a-real-model-xyz")


def test_teacher_dtype_auto_follows_the_device(monkeypatch):
    import torch

    monkeypatch.setattr(running, "cpu_has_native_bf16", lambda: False)
    assert running.teacher_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(running, "cpu_has_native_bf16", lambda: True)
    assert running.teacher_dtype("auto", "cpu") == torch.bfloat16
    assert running.teacher_dtype("float32", "cpu") == torch.float32
    assert running.teacher_dtype("float16", "cpu") == torch.float16


def test_teacher_attention_auto_is_eager_on_a_cpu_up_to_1024_tokens():
    assert running.teacher_attention("auto", "cpu", 256) == "eager"
    assert running.teacher_attention("auto", "cpu", 1024) == "eager"
    assert running.teacher_attention("auto", "cpu", 1025) is None     # the model's own (sdpa)
    assert running.teacher_attention("auto", "cuda", 256) is None
    assert running.teacher_attention("sdpa", "cpu", 256) == "sdpa"
    assert running.teacher_attention("eager", "cuda", 4096) == "eager"


def test_eager_and_sdpa_teachers_give_the_same_logits(teacher_dir, tok):
    """teacher.attention changes the speed, not the targets: the same logits (fp32), on a padded
    batch and a packed one (position_ids restarting per document)."""
    import torch

    from stillroom.data.examples import Example, collate, model_inputs
    from stillroom.models import core as models
    m = models.load(str(teacher_dir)).model.eval()
    a, b = list(range(5, 30)), list(range(40, 49))
    padded = collate([Example(a, a), Example(b, b)], tok.pad_token_id)
    packed = collate([Example(a + b, a + b, (len(a), len(b))), Example(b, b)], tok.pad_token_id)
    out = {}
    for impl in ("sdpa", "eager"):
        running.set_teacher_attention(m, impl, "cpu", 64)
        assert m.config._attn_implementation == impl
        with torch.inference_mode():
            out[impl] = [m(**model_inputs(x), use_cache=False).logits for x in (padded, packed)]
    for s, e in zip(out["sdpa"], out["eager"]):
        torch.testing.assert_close(e[0], s[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(e[1, :len(b)], s[1, :len(b)], rtol=1e-4, atol=1e-5)   # not the padding


def test_load_teachers_gives_a_mix_teacher_its_attention(teacher_dir, tok):
    """At the defaults on a CPU a teacher.mix entry runs eager attention; a row longer than 1024
    tokens, or an explicit choice, keeps sdpa (the primary's is set before the data: the CLI test)."""
    from accelerate import Accelerator

    from stillroom.config import Config
    from stillroom.models import core as models
    from stillroom.teachers.core import LiveTeacher, load_teachers
    acc = Accelerator(cpu=True)
    for mix, data, want in (({}, {}, "eager"), ({}, {"seq_len": 2048}, "sdpa"), ({"attention": "sdpa"}, {}, "sdpa")):
        cfg = Config.model_validate({"teacher": {"model": str(teacher_dir),
                                                 "mix": [{"name": "two", "model": str(teacher_dir), **mix}]},
                                     "data": data})
        primary = models.load(str(teacher_dir)).model
        assert primary.config._attn_implementation == "sdpa"
        out = load_teachers(cfg, LiveTeacher(primary), models.logits_width(primary), tok, acc)
        assert [x.model.config._attn_implementation for x in out] == ["sdpa", want], (mix, data)


def test_output_head_refuses_a_soft_capped_head(teacher_dir):
    """The lean path is only taken when logits == hidden @ W.T: a model that rescales its logits
    (here: a hook standing in for soft-capping) falls back to the plain path."""
    from stillroom.models import core as models
    m = models.load(str(teacher_dir)).model
    m.lm_head.register_forward_hook(lambda mod, inp, out: 30 * (out / 30).tanh())
    assert running.output_head(m) is None


def test_final_hidden_is_the_last_hidden_state_and_keeps_no_other_layers(tok, monkeypatch):
    """The lean path's student side: the base model's output, bit for bit the last of
    output_hidden_states, without asking the model for every layer's hidden states."""
    from conftest import make_model
    m = make_model(tok, layers=3)
    ids = torch.tensor([tok("The cat sat on the mat.")["input_ids"]])
    want = m(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    asked = []
    real = type(m).forward
    monkeypatch.setattr(type(m), "forward", lambda self, *a, **k: (asked.append(k.get("output_hidden_states")),
                                                                   real(self, *a, **k))[1])
    got = running.final_hidden(m, input_ids=ids)
    assert torch.equal(got, want) and asked == [None]
