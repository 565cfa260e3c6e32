"""Lean loading (issue 15): a teacher loads straight into the dtype it runs in, a student built
from its layers is still the exact fp32 copy, and a tokenizer-only need reads no weights."""
import pytest
import torch

from stillroom.recipes import load_config
from stillroom.models import core as models

from conftest import tiny_overrides


def test_a_model_loads_straight_into_the_dtype_asked(teacher_dir, monkeypatch):
    import transformers
    asked = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        asked.append(k.get("dtype"))
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    m = models.load(str(teacher_dir), dtype=torch.bfloat16).model
    assert asked == [torch.bfloat16]          # read as bf16, never materialized in fp32 first
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_a_student_cut_from_a_bf16_teacher_is_the_exact_fp32_copy(teacher_dir):
    fp32 = models.load(str(teacher_dir))
    bf16 = models.load(str(teacher_dir), dtype=torch.bfloat16)
    want, keep = models.student_from_teacher(fp32.model, num_layers=2)
    got, keep2 = models.student_from_teacher(bf16.model, num_layers=2, folder=bf16.path)
    assert keep == keep2
    w, g = want.state_dict(), got.state_dict()
    assert all(g[k].dtype == torch.float32 and torch.equal(w[k], g[k]) for k in w)
    # from the config and the folder alone (a cached teacher, not loaded at all)
    alone, _ = models.student_from_teacher(fp32.model.config, num_layers=2, folder=teacher_dir)
    assert all(torch.equal(w[k], alone.state_dict()[k]) for k in w)


def test_distill_loads_the_teacher_in_its_run_dtype_and_trains_the_student_in_fp32(tmp_path, teacher_dir,
                                                                                   chat_file, monkeypatch):
    from stillroom.run import distill as train
    seen = {}
    real = train.run_distill

    def spy(s, cfg, loaded, teacher, student, *a, **k):
        seen["teacher"] = {p.dtype for p in loaded.model.parameters()}
        seen["student"] = {p.dtype for p in student.parameters()}
        return real(s, cfg, loaded, teacher, student, *a, **k)

    monkeypatch.setattr(train, "run_distill", spy)
    cfg = load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "r") + ["teacher.dtype=bfloat16"])
    train.distill(cfg, progress=False)
    assert seen == {"teacher": {torch.bfloat16}, "student": {torch.float32}}


def test_a_tokenizer_alone_reads_no_weights(teacher_dir, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    tok = models.load_tokenizer(str(teacher_dir))
    assert tok.pad_token is not None and len(tok) > 0
    with pytest.raises(Exception, match="weights were read"):   # (the spy works: load does read them)
        models.load(str(teacher_dir))


def test_the_shipped_files_are_where_the_code_looks():
    """The bundled prompts (the default data), the lm-eval task and the recipes ship inside the
    package: each path the code names exists (a module moved a folder down once lost two)."""
    from stillroom.recipes import RECIPES
    from stillroom.eval.harness import ASSETS
    from stillroom.teachers.generate import BUNDLED_PROMPTS

    assert BUNDLED_PROMPTS.is_file() and BUNDLED_PROMPTS.read_text().strip()
    assert any(ASSETS.glob("*.yaml")), ASSETS
    assert any(RECIPES.glob("*.yaml")), RECIPES
