"""The loop: loss normalization across micro-batches and processes, exact resume, a full run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file


from conftest import distill_tiny, launch, on_cpu_only, tiny_overrides
from ddp_grads import step_grads

HERE = Path(__file__).resolve().parents[1]   # tests/: the workers live there


def assert_same_grads(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


def test_four_micro_batches_of_one_equal_one_batch_of_four(teacher_dir, chat_file):
    acc = Accelerator(cpu=True)
    g4x1, s4x1, _ = step_grads(str(teacher_dir), str(chat_file), 4, acc)
    # the same 4 examples as one micro-batch of 4
    g1x4, s1x4, (batch,) = step_grads(str(teacher_dir), str(chat_file), 1, acc, batch_size=4)
    assert s4x1["target_tokens"] == s1x4["target_tokens"]
    assert s4x1["loss"] == pytest.approx(s1x4["loss"], rel=1e-5)
    assert_same_grads(g4x1, g1x4)
    # The examples have different lengths, so averaging per micro-batch would NOT match:
    lengths = [int((b != -100).sum()) for b in batch.targets]
    assert len(set(lengths)) > 1


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_lean_step_equals_plain_step(teacher_dir, chat_file, kind):
    """The default lean path (logits made in the loss from hidden states, labelled rows only, for
    student and teacher) gives the plain full-logit path's loss and gradients."""
    from stillroom.models import core as models
    from stillroom.models import running
    t = models.load(str(teacher_dir)).model
    assert running.output_head(t) is not None and running.output_head(t, base=True) is not None  # lean path taken
    acc = Accelerator(cpu=True)
    lean, s_lean, _ = step_grads(str(teacher_dir), str(chat_file), 2, acc, batch_size=2, kind=kind, lean=True)
    plain, s_plain, _ = step_grads(str(teacher_dir), str(chat_file), 2, acc, batch_size=2, kind=kind, lean=False)
    assert s_lean["loss"] == pytest.approx(s_plain["loss"], rel=1e-5)
    assert_same_grads(lean, plain)


@pytest.mark.parametrize("lean", [True, False])
def test_compiled_loss_step_equals_eager_step(teacher_dir, chat_file, lean, ran):
    """loss.compile=true (auto's choice on a CPU at a real vocabulary; the tiny one here is below
    it) gives the eager kernel's loss and gradients, on both paths, at T 2 with CE."""
    from stillroom.losses import fused

    acc = Accelerator(cpu=True)
    compiled, s_c, _ = step_grads(str(teacher_dir), str(chat_file), 2, acc, batch_size=2, lean=lean, compile=True)
    assert ran and set(ran) == ({"dense_into"} if lean else {"dense"}) and fused._broken is None
    eager, s_e, _ = step_grads(str(teacher_dir), str(chat_file), 2, acc, batch_size=2, lean=lean, compile=False)
    assert s_c["loss"] == pytest.approx(s_e["loss"], rel=1e-5)
    assert_same_grads(compiled, eager)


def test_compile_auto_is_on_for_a_real_vocabulary_on_a_cpu():
    from stillroom.losses.fused import VOCAB_MIN, wanted

    assert wanted("auto", 49152, "cpu") and not wanted("auto", 320, "cpu") and not wanted("auto", 49152, "cuda")
    assert wanted(True, 320, "cuda") and not wanted(False, 49152, "cpu") and VOCAB_MIN == 8192


def test_two_processes_match_one(tmp_path, teacher_dir, chat_file):
    launch(2, HERE / "ddp_grads.py", teacher_dir, chat_file, tmp_path / "two.pt", 2)
    two = torch.load(tmp_path / "two.pt")
    assert two["world"] == 2
    one, stats, _ = step_grads(str(teacher_dir), str(chat_file), 4, Accelerator(cpu=True))
    assert two["stats"]["target_tokens"] == stats["target_tokens"]
    assert two["stats"]["loss"] == pytest.approx(stats["loss"], rel=1e-5)
    assert_same_grads(two["grads"], one)


@pytest.mark.parametrize("precision, compiled", [("no", False), ("bf16", False), ("bf16", True)])
def test_resume_continues_exactly(tmp_path, teacher_dir, chat_file, precision, compiled):
    """In fp32 and under bf16 autocast (train.mixed_precision=auto's choice on a device with native
    bf16), and with the compiled loss kernel (loss.compile=auto's choice on a CPU at a real vocabulary)."""
    a, b = tmp_path / "a", tmp_path / "b"
    mp = f"train.mixed_precision={precision} loss.compile={str(compiled).lower()}".split()
    distill_tiny(teacher_dir, chat_file, a, "train.max_steps=6", "train.save_every=3", "train.grad_accum=2", *mp)
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    # b: a run "stopped" right after its step-3 checkpoint
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_0000003", b / "checkpoints" / "step_0000003")
    distill_tiny(teacher_dir, chat_file, b, "train.max_steps=6", "train.save_every=3", "train.grad_accum=2", *mp,
        resume=True)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # and the step-3 weights really differ from the final ones (the resume did train)
    w3 = load_file(a / "checkpoints" / "step_0000003" / "model.safetensors")
    assert any(not torch.equal(w3[k], wa[k]) for k in w3)


def test_full_run_writes_a_loadable_student(tmp_path, teacher_dir, chat_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = distill_tiny(teacher_dir, chat_file, out, "train.max_steps=8", "train.lr=3e-3", "train.eval_every=4",
                 "student.init=config", "student.hidden_size=32", "student.num_heads=4", "loss.alpha=1.0")
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32 and len(tok) > 0
    assert (final / "stillroom.yaml").is_file()
    metrics = json.loads((final / "metrics.json").read_text())
    cols = metrics["eval"]
    assert set(cols) == {"teacher", "student before", "student after"}
    # Training on the teacher's own signal brings the student closer to it.
    assert cols["student after"]["kl_per_token"] < cols["student before"]["kl_per_token"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "step" in x] == list(range(1, 9))
    assert any("eval" in x for x in lines)
    assert "perplexity" in result["table"] and "agreement" in result["table"]


def test_two_process_distill_equals_one_process(tmp_path, teacher_dir, chat_file):
    """The whole loop under `accelerate launch --num_processes 2` (data-parallel, gloo) ends with
    the same student as one process taking the same global batch as 2 micro-batches."""
    out = tmp_path / "ddp"
    launch(2, "-m", "stillroom", "distill", *tiny_overrides(teacher_dir, chat_file, out), "--no-progress")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    one = tmp_path / "one"
    distill_tiny(teacher_dir, chat_file, one, "train.grad_accum=2")
    w2, w1 = load_file(out / "final" / "model.safetensors"), load_file(one / "final" / "model.safetensors")
    assert w2.keys() == w1.keys()
    for k in w1:  # fp32 sums in a different order: equal up to rounding, through 3 AdamW steps
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_prefetch_thread_changes_nothing(tmp_path, teacher_dir, chat_file):
    """Batches built ahead on the data thread give bit-identical weights to building them inline."""
    on, off = tmp_path / "on", tmp_path / "off"
    distill_tiny(teacher_dir, chat_file, on, "train.max_steps=4", "train.prefetch=true", "data.pack=true")
    distill_tiny(teacher_dir, chat_file, off, "train.max_steps=4", "train.prefetch=false", "data.pack=true")
    wa, wb = load_file(on / "final" / "model.safetensors"), load_file(off / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_threads_are_shared_out_among_processes(monkeypatch):
    from types import SimpleNamespace

    from stillroom.config import Config
    from stillroom.run.tracking import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr(os, "cpu_count", lambda: 8)
        assert set_threads(Config(), SimpleNamespace(num_processes=2)) == 4 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_threads(Config(), SimpleNamespace(num_processes=2)) == 3
        assert set_threads(Config.model_validate({"train": {"threads": 1}}), SimpleNamespace(num_processes=2)) == 1
    finally:
        torch.set_num_threads(before)


KEPT = """
import ctypes, sys, torch
from stillroom.run.tracking import keep_cpu_memory

print(keep_cpu_memory())
x = torch.ones(64 << 20)   # 256 MB: glibc alone maps it and hands it back on free
del x

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
print(libc.mallinfo2().fordblks >> 20)   # MB free but kept in the process
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.path.exists("/proc/driver/nvidia"),
                    reason="glibc on a machine without a GPU")
@pytest.mark.parametrize("setting", ["keep", "off", "user"])
def test_freed_memory_is_kept_for_the_next_step(setting):
    """keep_cpu_memory: a freed 256 MB block stays in the process (the next step reuses its pages
    instead of faulting them in again); STILLROOM_KEEP_MEMORY=0 and a user's own glibc settings win."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "STILLROOM_KEEP_MEMORY"}
    env |= {"off": {"STILLROOM_KEEP_MEMORY": "0"}, "user": {"MALLOC_TRIM_THRESHOLD_": "131072"}}.get(setting, {})
    r = subprocess.run([sys.executable, "-c", KEPT], env=env, capture_output=True, text=True, check=True)
    said, kept_mb = r.stdout.split("\n")[:2]
    assert said.startswith({"keep": "freed memory kept", "off": "glibc defaults", "user": "glibc as set"}[setting])
    assert (int(kept_mb) >= 256) == (setting == "keep"), r.stdout


@on_cpu_only("teacher.attention=auto picks eager attention on a CPU only")
def test_a_run_gives_the_teacher_eager_attention_on_a_cpu_and_the_student_its_own(tmp_path, teacher_dir, text_file,
                                                                                 monkeypatch):
    """teacher.attention=auto on a CPU: the teacher's forward runs eager attention (faster there at
    these lengths), while the student built from its config keeps sdpa."""
    from stillroom.models import core as models
    seen = {}
    load, build = models.load, models.build_student

    def spy_load(*a, **kw):
        loaded = load(*a, **kw)
        seen["teacher"] = loaded.model
        return loaded

    def spy_build(*a, **kw):
        out = build(*a, **kw)
        seen["student"] = out[0]
        return out
    monkeypatch.setattr(models, "load", spy_load)
    monkeypatch.setattr(models, "build_student", spy_build)
    distill_tiny(teacher_dir, text_file, tmp_path / "o", "train.max_steps=1")
    assert seen["teacher"].config._attn_implementation == "eager"
    assert seen["student"].config._attn_implementation == "sdpa"


def test_student_attention_is_the_students_own_setting(tmp_path, teacher_dir, text_file, monkeypatch):
    """student.attention sets the student's implementation (auto keeps the model's own); an
    implementation this install cannot run is one line, exit 2, before anything is written."""
    from stillroom.models import core as models
    seen = {}
    build = models.build_student

    def spy_build(*a, **kw):
        out = build(*a, **kw)
        seen["student"] = out[0]
        return out
    monkeypatch.setattr(models, "build_student", spy_build)
    distill_tiny(teacher_dir, text_file, tmp_path / "o", "train.max_steps=1", "student.attention=eager")
    assert seen["student"].config._attn_implementation == "eager"
    from stillroom.errors import UserError
    with pytest.raises(UserError, match=r"student.attention=flash_attention_2 cannot run here"):
        distill_tiny(teacher_dir, text_file, tmp_path / "flash", "train.max_steps=1", "student.attention=flash_attention_2")
    assert not (tmp_path / "flash").exists()


@pytest.mark.parametrize("loss", [[], ["loss.lean=false"], ["loss.terms={ce: 0.5, forward_kl: 0.5, hidden_mse: 0.1}"]],
                         ids=["lean", "plain", "hidden states"])
def test_gradient_checkpointing_trains_the_same_weights(tmp_path, teacher_dir, chat_file, loss):
    """train.gradient_checkpointing keeps fewer tensors for the backward (counted: the layers'
    activations are recomputed instead) and gives the same gradients, so the same weights, bit for
    bit on a CPU."""
    saved = {}
    for name, extra in (("plain", []), ("checkpointed", ["train.gradient_checkpointing=true"])):
        count = {"n": 0}

        def pack(x, count=count):
            count["n"] += 1
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            distill_tiny(teacher_dir, chat_file, tmp_path / name, "train.max_steps=2", *loss, *extra)
        saved[name] = count["n"]
    assert saved["checkpointed"] < saved["plain"], saved
    a = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    b = load_file(tmp_path / "checkpointed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
