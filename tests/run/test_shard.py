"""FSDP2 (train.shard=fsdp, teacher.shard): under 2 gloo processes the student (and the teacher
when asked) is sharded per decoder layer, and each objective's gradients equal those of one process
taking the same global batch; a sharded run checkpoints its shards, resumes bit-identical to the
uninterrupted sharded run after a failure, and its final/ is a plain Hugging Face folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import failure, launch, run_cli, tiny_overrides

HERE = Path(__file__).resolve().parents[1]   # tests/: the workers live there


def test_sharded_gradients_equal_one_process(tmp_path, teacher_dir, chat_file):
    from fsdp_grads import OBJECTIVES
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    launch(2, HERE / "fsdp_grads.py", teacher_dir, chat_file, two, "fsdp", 1)
    r = subprocess.run([sys.executable, HERE / "fsdp_grads.py", teacher_dir, chat_file, one, "fsdp", "2"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, failure(r.stderr)
    for name in [*OBJECTIVES, "codistill"]:
        a, b = torch.load(two / f"{name}.pt"), torch.load(one / f"{name}.pt")
        assert a["world"] == 2 and a["sharded"].startswith("FSDP") and not b["sharded"].startswith("FSDP"), name
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), name
        assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) >= 20, name
        for k in b["grads"]:
            torch.testing.assert_close(a["grads"][k], b["grads"][k], rtol=1e-5, atol=1e-7, msg=f"{name} {k}")
    assert len(torch.load(two / "terms.pt")["grads"]) > len(torch.load(two / "hard.pt")["grads"])   # projections


def test_a_sharded_run_fails_together_and_resumes_exactly(tmp_path, teacher_dir, chat_file):
    """Process 1 raises in step 3's forward: the launch stops (the launcher ends process 0, which
    waits in the sharded forward), with the step's one line; the sharded checkpoint of step 2 is
    there, and --resume from it ends with the uninterrupted sharded run's weights. final/ loads in
    plain transformers."""
    from transformers import AutoModelForCausalLM

    over = lambda out: [*tiny_overrides(teacher_dir, chat_file, out), "train.max_steps=4", "train.save_every=2",  # noqa: E731
                        "train.shard=fsdp", "teacher.shard=true", "train.eval_every=3", "--no-progress"]
    clean, failed = tmp_path / "clean", tmp_path / "failed"
    r = launch(2, "-m", "stillroom", "distill", *over(clean))
    assert "the student sharded over 2 processes (FSDP2, per decoder layer" in r.stderr and "and the teacher" in r.stderr
    r = launch(2, "-m", "stillroom", "distill", *over(failed), check=False, timeout=300,
               env={"STILLROOM_FAULT": "micro_batch:3:raise", "STILLROOM_FAULT_RANK": "1"})
    assert r.returncode != 0
    assert "stillroom: error: step 3 failed: RuntimeError: injected failure at micro_batch" in r.stderr, r.stderr[-3000:]
    ck = failed / "checkpoints" / "step_0000002"
    assert (ck / "sharded").is_dir() and (ck / "trainer_state.json").is_file()
    launch(2, "-m", "stillroom", "distill", *over(failed), "--resume")
    want, got = load_file(clean / "final" / "model.safetensors"), load_file(failed / "final" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    model = AutoModelForCausalLM.from_pretrained(clean / "final")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    log = [json.loads(x) for x in (clean / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "step" in x] == [1, 2, 3, 4] and any("eval" in x for x in log)


def test_a_sharded_bf16_student_gathers_in_bf16_and_learns_as_one_process(tmp_path, teacher_dir, chat_file):
    """train.mixed_precision=bf16 under FSDP2: the student's weights are gathered in bf16 and its
    gradients reduced in fp32 (MixedPrecisionPolicy); its shards and final/ stay fp32, and its
    losses follow one process's bf16 autocast run of the same global batch (to bf16's rounding)."""
    over = lambda out: [*tiny_overrides(teacher_dir, chat_file, out), "train.max_steps=4", "train.lr=3e-3",  # noqa: E731
                        "train.mixed_precision=bf16", "train.shard=fsdp", "--no-progress"]
    r = launch(2, "-m", "stillroom", "distill", *over(tmp_path / "two"))
    assert "gathered in bf16, gradients reduced in fp32" in r.stderr
    r = run_cli("distill", *over(tmp_path / "one"), "train.grad_accum=2", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    losses = {}
    for name in ("two", "one"):
        log = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [x["loss"] for x in log if "loss" in x]
        w = load_file(tmp_path / name / "final" / "model.safetensors")
        assert {t.dtype for t in w.values()} == {torch.float32}, name
    assert len(losses["two"]) == 4 and losses["two"][-1] < losses["two"][0]
    assert losses["two"] == pytest.approx(losses["one"], rel=2e-2)


@pytest.mark.parametrize("stored,block", [("safetensors", None), ("safetensors", 100), ("bin", None)])
def test_a_sharded_teacher_is_never_loaded_whole(tmp_path, teacher_dir, stored, block):
    """teacher.shard=true over 2 processes: the teacher is built on the meta device and sharded, and
    the main process reads its safetensors a process's rows at a time (in blocks of at most
    shard.BLOCK elements), each sent to its process: no process loads it whole (a folder without
    safetensors is loaded whole on the main process alone). Every parameter arrives (the tied head too) and its logits equal the whole teacher's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = teacher_dir
    if stored == "bin":
        src = tmp_path / "bin"
        model = AutoModelForCausalLM.from_pretrained(teacher_dir)
        model.config.save_pretrained(src)
        torch.save(model.state_dict(), src / "pytorch_model.bin")
        AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(src)
        assert not list(src.glob("*.safetensors"))
    out = tmp_path / "load.json"
    launch(2, HERE / "shard_load.py", src, out, *([block] if block else []))
    r = json.loads(out.read_text())
    nothing = {"elements_read": 0, "largest_read": 0, "whole_tensors_read": 0, "whole_loads": 0}
    if stored == "safetensors":   # every weight read once, a process's rows at a time
        largest = r["half_of_largest"] if block is None else r["counts"][0]["largest_read"]
        assert block is None or 32 <= largest <= block   # (a row of the tiny teacher: 32 elements)
        assert r["counts"][0] == {**nothing, "elements_read": r["elements"], "largest_read": largest}
    else:
        assert r["counts"][0] == {**nothing, "whole_loads": 1}
    assert r["counts"][1] == nothing
    assert r["tied"] and r["layers_sharded"] and r["equal"] and r["same_logits"]
    assert r["params"][0] == r["params"][1]   # counted whole, though each process holds its shards


def test_a_sharded_teacher_needs_its_data_given(tmp_path, teacher_dir, chat_file):
    """The sharded teacher does not generate the default data (one line, before any loading)."""
    over = [o for o in tiny_overrides(teacher_dir, chat_file, tmp_path / "o") if not o.startswith("data.path")]
    r = launch(2, "-m", "stillroom", "distill", *over, "train.shard=fsdp", "teacher.shard=true", "--no-progress",
               check=False)
    errors = [ln for ln in r.stderr.splitlines() if "stillroom: error:" in ln]
    assert r.returncode != 0 and "(exitcode: 2)" in r.stderr, r.stderr[-3000:]   # (the launcher's own is 1)
    # each process says it, unless the launcher stopped one before it could (seen on a loaded machine)
    assert len(errors) in (1, 2) and all("the sharded teacher does not generate the default data; set data.path"
                                         in e for e in errors), errors
    assert "Traceback" not in r.stderr.split("(exitcode: 2)")[0]   # (the launcher's traceback of its own follows)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,why", [
    (["train.shard=fsdp", "train.qat=q8_0"], "does not run train.qat yet"),
    (["teacher.shard=true"], "set train.shard=fsdp"),
    (["train.shard=fsdp", "teacher.shard=true", "teacher.offload=true"], "not with teacher.kind=cache, teacher.offload"),
    (["train.shard=fsdp", "teacher.shard=true", "loss.cross_tokenizer=uld"], "not built for loss.cross_tokenizer"),
])
def test_what_sharding_does_not_run_yet_is_refused_in_one_line(tmp_path, teacher_dir, chat_file, extra, why):
    from conftest import assert_user_error
    r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "o"), *extra)
    assert_user_error(r, why)
    r = run_cli("codistill", "codistill", f"teacher.model={teacher_dir}", "train.shard=fsdp", "codistill.mode=weights")
    assert_user_error(r, "train.shard=fsdp shards the peers of codistill.mode=mutual")


def test_sharded_mutual_codistill_resumes_exactly(tmp_path, teacher_dir, chat_file):
    """codistill.mode=mutual with every peer sharded: its sharded checkpoint of step 2, resumed in a
    fresh folder, ends with the uninterrupted run's peers; final/<peer> are plain model folders."""
    import shutil

    from conftest import peer_weights, write_config

    a, b = tmp_path / "a", tmp_path / "b"
    train = {"max_steps": 4, "save_every": 2, "log_every": 1, "lr": 3e-3, "warmup_steps": 1, "batch_size": 4,
             "shard": "fsdp"}
    r = launch(2, "-m", "stillroom", "codistill",
               write_config(tmp_path / "a.yaml", teacher_dir, chat_file, a, train={**train, "output_dir": str(a)}),
               "--no-progress")
    assert "every peer sharded over 2 processes" in r.stderr
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_0000002", b / "checkpoints" / "step_0000002")
    launch(2, "-m", "stillroom", "codistill",
           write_config(tmp_path / "b.yaml", teacher_dir, chat_file, b, train={**train, "output_dir": str(b)}),
           "--resume", "--no-progress")
    for name in ("a", "b"):
        want, got = peer_weights(a, name), peer_weights(b, name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
