"""Faults mid-run: non-finite steps, a teacher that breaks, an API that goes down. Each ends in a
clear state: skipped-and-counted, or stopped with one line and a resumable state."""
import json
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from safetensors.torch import load_file

from stillroom import cli
from stillroom.recipes import load_config
from stillroom.errors import UserError
from stillroom.run import loop
from stillroom.run import distill as train
from stillroom.teachers.core import LiveTeacher

from conftest import reply_chat_completion, tiny_overrides


def run(teacher_dir, data, out, *extra, resume=False):
    cfg = load_config(None, tiny_overrides(teacher_dir, data, out) + list(extra))
    return train.distill(cfg, resume=resume, overwrite=not resume, progress=False)


def poison(monkeypatch, steps, what="grad"):
    """Make the given (1-based) optimizer steps non-finite: a NaN in a gradient, or the loss."""
    real, seen = loop.accumulate, {"n": 0}

    def accumulate(trainees, *a, **k):
        stats = real(trainees, *a, **k)
        seen["n"] += 1
        if seen["n"] in steps:
            if what == "grad":
                p = next(p for p in trainees[0].model.parameters() if p.grad is not None)
                p.grad.view(-1)[0] = float("nan")
            else:
                stats["loss"] = float("inf")
        return stats
    monkeypatch.setattr(loop, "accumulate", accumulate)


@pytest.mark.parametrize("what", ["grad", "loss"])
def test_a_non_finite_step_is_skipped_and_counted(what, tmp_path, teacher_dir, chat_file, monkeypatch):
    poison(monkeypatch, {2}, what)
    run(teacher_dir, chat_file, tmp_path / "r", "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=3")
    last = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"step"' in x][-1]
    assert last["bad_steps"] == 1
    # step 2 made no update: the final weights are step 1's
    w1 = load_file(tmp_path / "r" / "checkpoints" / "step_0000001" / "model.safetensors")
    w2 = load_file(tmp_path / "r" / "final" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w2)
    assert all(torch.isfinite(v).all() for v in w2.values())


def test_a_non_finite_fp16_step_backs_the_loss_scale_off_and_training_goes_on(tmp_path, teacher_dir, chat_file,
                                                                           monkeypatch):
    """fp16 on a GPU: Accelerate scales the loss and unscales the gradients in clip_grad_norm_,
    and the optimizer's step updates the scaler. A skipped step must update it too, or the next
    step's unscale_ raises. Emulated on the CPU (where Accelerate makes no scaler) with the GPU's
    path: a GradScaler("cpu") and native amp."""
    from stillroom.run import tracking
    real_make, scalers = tracking.make_accelerator, []

    def make(cfg, out, threads=True):
        acc = real_make(cfg, out, threads=threads)
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8), True
        scalers.append(acc.scaler)
        return acc
    monkeypatch.setattr(tracking, "make_accelerator", make)
    poison(monkeypatch, {2}, "grad")
    # (teacher.dtype=float32: CPU autocast does not cast a bf16 teacher head to fp16 as CUDA autocast does)
    run(teacher_dir, chat_file, tmp_path / "r", "train.max_steps=3", "train.mixed_precision=fp16", "teacher.dtype=float32")
    last = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"step"' in x][-1]
    assert last["step"] == 3 and last["bad_steps"] == 1
    assert scalers[0].get_scale() < 2.0 ** 8   # backed off at the skipped step


def test_too_many_non_finite_steps_stop_the_run(tmp_path, teacher_dir, chat_file, monkeypatch):
    poison(monkeypatch, {2, 3})
    with pytest.raises(UserError, match=r"stopping at step 3: 2 steps had a non-finite.*max_bad_steps=1"):
        run(teacher_dir, chat_file, tmp_path / "r", "train.max_steps=5", "train.max_bad_steps=1")


def failing_on_call(real, n):
    """`real`, raising a CUDA-like error on its n-th call."""
    seen = {"n": 0}

    def flaky(*a, **k):
        seen["n"] += 1
        if seen["n"] == n:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*a, **k)
    return flaky


def codistill_run(teacher_dir, data, out, *extra, resume=False):
    from stillroom.config import CodistillRunConfig
    from stillroom.run.codistill import codistill
    over = [o for o in tiny_overrides(teacher_dir, data, out) if not o.startswith("student.")]
    cfg = load_config("codistill", over + ["peers.0.num_layers=2", "peers.1.layers=[0,3]", *extra],
                      CodistillRunConfig)
    return codistill(cfg, resume=resume, overwrite=not resume, progress=False)


def test_codistill_skips_a_non_finite_step(tmp_path, teacher_dir, chat_file, monkeypatch):
    """The NaN guard covers co-distillation: a NaN gradient in one peer skips the step for every
    peer, counted; more than train.max_bad_steps stop the run with one line."""
    real, seen = loop.accumulate, {"n": 0}

    def poisoned(peers, *a, **k):
        out = real(peers, *a, **k)
        seen["n"] += 1
        if seen["n"] == 2:
            p = next(p for p in peers[1].model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(loop, "accumulate", poisoned)
    out = tmp_path / "r"
    codistill_run(teacher_dir, chat_file, out, "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=3")
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x][-1]
    assert last["bad_steps"] == 1
    for name in ("a", "b"):   # step 2 made no update to either peer: the final weights are step 1's
        w1 = torch.load(out / "checkpoints" / "step_0000001" / f"{name}.pt", weights_only=False)["model"]
        w2 = load_file(out / "final" / name / "model.safetensors")
        assert all(torch.equal(w1[k], w2[k]) for k in w2), name
    # every step's loss non-finite
    monkeypatch.setattr(loop, "accumulate", lambda peers, *a, **k: {
        "loss": {p.name: float("nan") for p in peers}, "target_tokens": 1, "tokens": 1})
    with pytest.raises(UserError, match=r"stopping at step 2: 2 steps had a non-finite.*max_bad_steps=1"):
        codistill_run(teacher_dir, chat_file, tmp_path / "s", "train.max_steps=4", "train.max_bad_steps=1")


def _finals(out):
    return {str(f.relative_to(out)): load_file(f) for f in sorted(out.glob("final/**/model.safetensors"))}


@pytest.mark.parametrize("command", ["distill", "codistill"])
def test_a_failure_mid_run_saves_state_and_resumes_exactly(command, tmp_path, teacher_dir, chat_file, monkeypatch):
    """A teacher (distill) or a step (codistill, on the same loop) failing mid-run: the traceback
    goes to error.log, the last completed step is checkpointed, one line says so, and --resume
    ends with the uninterrupted run's weights."""
    go = run if command == "distill" else codistill_run
    owner, name = (LiveTeacher, "targets") if command == "distill" else (loop, "accumulate")
    ref = tmp_path / "ref"
    go(teacher_dir, chat_file, ref, "train.max_steps=5")
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, failing_on_call(real, 3))
    out = tmp_path / "r"
    with pytest.raises(UserError, match=r"step 3 failed: RuntimeError: CUDA error.*checkpoint of step 2 saved.*--resume"):
        go(teacher_dir, chat_file, out, "train.max_steps=5")
    assert "Traceback" in (out / "error.log").read_text()
    monkeypatch.setattr(owner, name, real)   # the cause is fixed
    go(teacher_dir, chat_file, out, "train.max_steps=5", resume=True)
    want, got = _finals(ref), _finals(out)
    assert want.keys() == got.keys() and len(want) == (1 if command == "distill" else 2)
    for f in want:
        assert all(torch.equal(want[f][k], got[f][k]) for k in want[f]), f


def _server(fail_after=None):
    """A fake OpenAI-compatible endpoint: the answer is a function of the prompt; after
    `fail_after` answers it returns 500 to everything until `state['healthy']` is set."""
    state = {"served": 0, "healthy": fail_after is None}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not state["healthy"] and state["served"] >= fail_after:
                self.send_response(500)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            state["served"] += 1
            reply_chat_completion(self, req["messages"][-1]["content"][::-1])

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


def test_an_api_teacher_failing_mid_run_stops_cleanly_and_resumes(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"question number {i}?\n" for i in range(12)))

    def generate(server, out):
        return cli.main(["generate", "--api", f"http://127.0.0.1:{server.server_port}/v1", "--api-model", "m",
                         "--prompts", str(prompts), "--out", str(out), "--max-retries", "1", "--concurrency", "1",
                         "--batch-size", "2", "--no-progress"])

    good, _ = _server()
    bad, state = _server(fail_after=5)
    try:
        assert generate(good, tmp_path / "ref.jsonl") == 0
        capsys.readouterr()
        assert generate(bad, tmp_path / "out.jsonl") == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("stillroom: error:")]
        assert len(err) == 1 and "500" in err[0] and "again" in err[0], err
        partial = (tmp_path / "out.jsonl").read_text().splitlines()
        assert 0 < len(partial) < 12
        state["healthy"] = True
        assert generate(bad, tmp_path / "out.jsonl") == 0   # the same command continues
    finally:
        good.shutdown()
        bad.shutdown()
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "ref.jsonl").read_text()


def test_a_failure_on_one_of_two_processes_saves_and_stops_both(tmp_path, teacher_dir, chat_file):
    """Process 1 raises in step 3 (in its forward, then in another run while building its data
    ahead): process 0 is not left waiting in a collective. Both stop with the one line naming the
    failing process, the checkpoint of step 2 is written by both together, and --resume from it
    ends with the weights of a run that never failed."""
    from conftest import launch

    over = lambda out: [*tiny_overrides(teacher_dir, chat_file, out), "train.max_steps=4", "--no-progress"]  # noqa: E731
    launch(2, "-m", "stillroom", "distill", *over(tmp_path / "clean"))
    import stillroom
    for where in ("micro_batch", "batch"):
        out = tmp_path / where
        r = launch(2, "-m", "stillroom", "distill", *over(out), check=False, timeout=300,
                   env={"STILLROOM_FAULT": f"{where}:3:raise", "STILLROOM_FAULT_RANK": "1"})
        assert r.returncode != 0
        lines = [x for x in r.stderr.splitlines() if x.startswith("stillroom: error:")]
        assert lines and all("failed on process 1: RuntimeError: injected failure at" in x for x in lines), \
            r.stderr[-3000:]
        assert "checkpoint of step 2 saved" in lines[0]
        # (the launcher prints its own ChildFailedError traceback when a process exits non-zero)
        assert f'File "{Path(stillroom.__file__).parent}' not in r.stderr, r.stderr[-6000:]
        assert "process 1:" in (out / "error.log").read_text()
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]
    out = tmp_path / "micro_batch"
    launch(2, "-m", "stillroom", "distill", *over(out), "--resume")
    want, got = load_file(tmp_path / "clean" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("mode,where", [("mutual", "micro_batch:3"), ("predictions", "micro_batch:4"),
                                        ("predictions", "micro_batch:6"), ("weights", "batch:3")])
def test_a_codistill_failure_on_one_of_two_processes_saves_and_stops_both(mode, where, tmp_path, teacher_dir,
                                                                           chat_file):
    """Co-distillation's cross-process steps have collectives of their own (the gather of
    predictions, the weight exchange): process 1 failing in step 2 or 3 -- predictions, three points
    a step (the shared batch's forward, its loss, the own batch's): before the gather (micro_batch:4,
    step 2's shared forward) and after it (micro_batch:6, step 2's own batch) -- stops both processes with the one line, the last completed step saved together, and
    --resume ends with the weights of a run that never failed."""
    from conftest import peer_weights, write_config
    from conftest import launch

    def config(out):
        return write_config(tmp_path / f"{out.name}.yaml", teacher_dir, chat_file, out,
                            codistill={"mode": mode, "exchange_every": 2, "burn_in": 0},
                            train={"max_steps": 4, "batch_size": 2, "output_dir": str(out)})
    clean, out = tmp_path / "clean", tmp_path / "failed"
    r = launch(2, "-m", "stillroom", "codistill", config(out), "--no-progress", check=False, timeout=300,
               env={"STILLROOM_FAULT": f"{where}:raise", "STILLROOM_FAULT_RANK": "1"})
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("stillroom: error:")]
    assert lines and all("failed on process 1: RuntimeError: injected failure at" in x for x in lines), \
        r.stderr[-3000:]
    done = int(lines[0].split("step ")[1].split()[0]) - 1
    assert done in (1, 2) and f"checkpoint of step {done} saved" in lines[0], lines[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{done:07d}"]
    if (mode, where) not in {("predictions", "micro_batch:4"), ("weights", "batch:3")}:
        return   # (resuming is the same after a failure anywhere in a step: checked twice, to save time)
    launch(2, "-m", "stillroom", "codistill", config(clean), "--no-progress")
    launch(2, "-m", "stillroom", "codistill", config(out), "--resume", "--no-progress")
    for name in ("a", "b"):
        want, got = peer_weights(clean, name), peer_weights(out, name)
        assert all(torch.equal(want[k], got[k]) for k in want), name
