"""The library seam: the Distiller examples of the README and the library guide run (a tiny teacher in place of SmolLM2),
trains the student in place, and leaves the caller's process as it was."""
import re
import signal
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
EXAMPLES = [("README.md", "### From Python"), ("docs/library.md", "## Distill from Python")]


def example(path: str, heading: str) -> str:
    text = (ROOT / path).read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("path,heading", EXAMPLES, ids=[p for p, _ in EXAMPLES])
def test_the_documented_example_runs_and_trains_the_student(path, heading, tmp_path, teacher_dir):
    code = example(path, heading)
    for old, new in [('load("smollm2-135m")', f'load({str(teacher_dir)!r})'), ("num_layers=6", "num_layers=2"),
                     ('"runs/lib"', repr(str(tmp_path / "lib"))), ('"max_steps": 20', '"max_steps": 3')]:
        assert old in code, old
        code = code.replace(old, new)
    code += "\nresult = (d, metrics, student)\n"
    from stillroom.distiller import Distiller
    real, seen = Distiller.train, {}

    def train(self, *a, **k):   # the caller's random state, around train() itself
        seen["before"] = torch.get_rng_state()
        out = real(self, *a, **k)
        seen["after"] = torch.get_rng_state()
        return out
    handler, threads = signal.getsignal(signal.SIGINT), torch.get_num_threads()
    Distiller.train = train
    try:
        env: dict = {}
        exec(compile(code, path, "exec"), env)
    finally:
        Distiller.train = real
    d, metrics, student = env["result"]
    assert d.student is student                        # trained in place
    before = metrics["eval"]["student before"]["kl_per_token"]
    assert metrics["eval"]["student after"]["kl_per_token"] < before
    assert (tmp_path / "lib" / "final" / "model.safetensors").is_file() and "perplexity" in metrics["table"]
    # the caller's process as it was: signal handlers, thread count, random state
    assert signal.getsignal(signal.SIGINT) is handler and torch.get_num_threads() == threads
    assert torch.equal(seen["before"], seen["after"])


def test_bad_input_is_an_ordinary_exception(tok):
    from conftest import make_model

    from stillroom import Distiller, UserError
    t, s = make_model(tok, layers=2), make_model(tok, layers=1, seed=1)
    with pytest.raises(ValueError, match="train_data is empty"):
        Distiller(t, s, tok, []).train()
    with pytest.raises(UserError, match="unknown config section 'trian'"):
        Distiller(t, s, tok, ["text"], trian={"max_steps": 1})
    with pytest.raises(UserError, match="loss.alpha"):
        Distiller(t, s, tok, ["text"], loss={"alpha": 2.0})


def test_two_runs_in_one_process_with_different_precisions(tmp_path, teacher_dir, chat_file):
    """Accelerate keeps one process-wide state that refuses a second precision: a caller's fp32
    run, then a bf16 one, both run (bench/precision.py does exactly this)."""
    from conftest import tiny_overrides

    from stillroom.recipes import load_config
    from stillroom.run.distill import distill
    for mp in ("no", "bf16"):
        cfg = load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / mp, **{
            "train.max_steps": 1, "train.mixed_precision": mp}))
        distill(cfg, overwrite=True, progress=False)
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / mp / "final" / "model.safetensors") for mp in ("no", "bf16"))
    assert any(not torch.equal(a[k], b[k]) for k in a)   # each ran in its own precision
