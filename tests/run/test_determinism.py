"""Same seed, same config -> the same final weights, bit for bit: with one process, and with two
(data-parallel, gloo). One process vs two is equal up to fp32 rounding only (the gradient sum runs
in another order): tests/run/test_train.py::test_two_process_distill_equals_one_process pins that
within rtol 1e-4 / atol 1e-5 after 3 AdamW steps.

The runs set train.deterministic: nothing changes on a CPU (bit-exact anyway); with the suite on a
GPU (STILLROOM_TEST_DEVICE=cuda) the one-process test is the promise that setting makes there:
PyTorch's deterministic algorithms and cuBLAS's fixed workspace give bit-exact reruns. Without it
a GPU repeats only to rounding. The two-process test runs gloo on the CPU whatever the target."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import distill_tiny, launch, tiny_overrides

EXTRA = ["train.max_steps=4", "data.pack=true", "loss.temperature=2.0", "train.deterministic=true"]


def weights(out):
    return load_file(out / "final" / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_one_process_is_deterministic(tmp_path, teacher_dir, chat_file, precision):
    extra = [*EXTRA, f"train.mixed_precision={precision}"]
    for name in ("a", "b"):
        distill_tiny(teacher_dir, chat_file, tmp_path / name, *extra)
    distill_tiny(teacher_dir, chat_file, tmp_path / "other_seed", *extra, "train.seed=1")
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not same(weights(tmp_path / "a"), weights(tmp_path / "other_seed"))   # the seed matters


def test_two_processes_are_deterministic(tmp_path, teacher_dir, chat_file):
    for name in ("a", "b"):
        launch(2, "-m", "stillroom", "distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / name), *EXTRA,
               "--no-progress")
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))
