"""Co-distillation: a mutual run end to end, exact resume of all peers, and both cross-process
modes under `accelerate launch --num_processes 2` (gloo on CPU)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from stillroom.config import CodistillRunConfig
from stillroom.recipes import load_config
from stillroom.run.codistill import codistill

from conftest import launch, peer_weights, run_cli, write_config

HERE = Path(__file__).resolve().parents[1]   # tests/: the workers live there


def load(path, overrides=()):
    return load_config(str(path), list(overrides), CodistillRunConfig)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_mutual_run_end_to_end(tmp_path, teacher_dir, chat_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = load(write_config(tmp_path / "c.yaml", teacher_dir, chat_file, out), ["train.max_steps=6"])
    result = codistill(cfg, progress=False)
    for name, layers in (("a", 2), ("b", 2)):
        m = AutoModelForCausalLM.from_pretrained(out / "final" / name)
        assert m.config.num_hidden_layers == layers
    assert AutoModelForCausalLM.from_pretrained(out / "final" / "b").config.hidden_size == 32
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    cols = metrics["eval"]
    assert set(cols) == {"teacher", "a before", "b before", "a after", "b after", "ensemble after"}
    # the peers learn from each other: they agree more after training than before
    assert metrics["peer_agreement"]["after"]["a/b"] > metrics["peer_agreement"]["before"]["a/b"]
    assert cols["b after"]["perplexity"] < cols["b before"]["perplexity"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))
    assert set(lines[0]["loss"]) == {"a", "b"}
    assert "ensemble after" in result["table"] and "agreement between peers a/b" in result["table"]


@pytest.mark.parametrize("extra", [[], ["codistill.ramp=3", "codistill.confidence=true"]])
def test_mutual_resume_is_exact_for_every_peer(tmp_path, teacher_dir, chat_file, extra):
    """Resumed at step 3 (during the ramp in the second case) -> the same weights as straight through."""
    a, b = tmp_path / "a", tmp_path / "b"
    over = ["train.max_steps=6", "train.save_every=3", "train.grad_accum=2", "codistill.burn_in=2",
            "peers.0.lr=1e-3", "codistill.teacher_weight=0.5", *extra]
    codistill(load(write_config(tmp_path / "a.yaml", teacher_dir, chat_file, a), over), progress=False)
    assert sorted(p.name for p in (a / "checkpoints" / "step_0000003").iterdir()) == \
        ["a.pt", "b.pt", "trainer_state.json"]
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_0000003", b / "checkpoints" / "step_0000003")
    codistill(load(write_config(tmp_path / "b.yaml", teacher_dir, chat_file, b), over),
              resume=True, progress=False)
    for name in ("a", "b"):
        assert_identical(peer_weights(a, name), peer_weights(b, name))
    step3 = torch.load(a / "checkpoints" / "step_0000003" / "a.pt", weights_only=False)["model"]
    final = peer_weights(a, "a")
    assert any(not torch.equal(step3[k], final[k]) for k in final)


def test_cli_codistill_errors_are_one_line(tmp_path, teacher_dir, chat_file):
    cfg = write_config(tmp_path / "c.yaml", teacher_dir, chat_file, tmp_path / "o")
    r = run_cli("codistill", cfg, "codistill.mode=predictions")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "one peer per process" in r.stderr and "--num_processes 2" in r.stderr
    r = run_cli("codistill", cfg, "peers.1.name=a")
    assert r.returncode == 2 and "distinct" in r.stderr
    r = run_cli("codistill", cfg, "peers.5.name=c")
    assert r.returncode == 2 and "peers.5.name=c" in r.stderr
    r = run_cli("codistill", cfg, "codistill.confidence=true", "codistill.mode=predictions")
    assert r.returncode == 2 and "add codistill.confidence=false for mode predictions" in r.stderr, r.stderr
    r = run_cli("codistill", cfg, "teacher.attention=flash_attention_2")   # not installed here
    assert r.returncode == 2 and "teacher.attention=flash_attention_2 cannot run here" in r.stderr, r.stderr
    r = run_cli("codistill", cfg, "eval.tasks=[rouge]")      # rows to score against, asked for before any writing
    assert r.returncode == 2 and "eval.tasks needs rows with reference answers" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_codistill_scores_its_tasks_for_every_peer_before_and_after(tmp_path, teacher_dir, chat_file):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"Tell me about the moon {i}.", "response": "The moon is bright."}) + "\n"
                          for i in range(3)))
    out = tmp_path / "o"
    cfg = write_config(tmp_path / "c.yaml", teacher_dir, chat_file, out)
    r = run_cli("codistill", cfg, "eval.tasks=[rouge]", f"eval.task_data={qa}", "eval.max_new_tokens=4",
                "train.max_steps=2", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "task rouge (tasks-rouge.jsonl)" in r.stdout and "a before" in r.stdout
    got = json.loads((out / "final" / "metrics.json").read_text())["tasks"]["rouge"]
    assert set(got["scores"]) == {"teacher", "a before", "b before", "a", "b"} and got["rows"] == 3
    assert "rougeL_vs_teacher" in got["scores"]["b"] and "rougeL_vs_teacher" not in got["scores"]["teacher"]
    rows = [json.loads(x) for x in (out / "tasks-rouge.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) >= {"teacher", "a", "b before"} for r in rows)
    assert "Task rouge (3 rows, greedy answers)" in (out / "report.html").read_text()


@pytest.mark.parametrize("top_k", [0, 5])
def test_predictions_mode_gradients_and_weight_exchange_across_two_processes(tmp_path, teacher_dir, chat_file, top_k):
    """Each process's gradient after one predictions-mode step equals the one computed in a single
    process from the same batches with the other peer run locally; the weight exchange leaves
    every process holding every peer's current weights."""
    from codistill_worker import perturbed, setup, step0_batches
    from conftest import ref_forward_kl

    from stillroom.losses import forward_kl, topk_targets

    launch(2, HERE / "codistill_worker.py", teacher_dir, chat_file, tmp_path / "w", top_k)
    got = [torch.load(tmp_path / f"w.{r}.pt", weights_only=False) for r in range(2)]
    assert got[0]["world"] == 2
    cfg, teacher, built, train = setup(str(teacher_dir), str(chat_file), top_k)
    pad, T, alpha, tw = teacher.tokenizer.pad_token_id, 2.0, 0.7, 0.25
    logits = lambda m, b: m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # noqa: E731
    for r in range(2):
        own, shared = step0_batches(cfg, train, r, 2, pad)
        model, other = built[r], built[1 - r]
        mask = (shared.targets != -100).double()
        with torch.no_grad():
            t_shared, o_shared = logits(teacher.model, shared), logits(other, shared)
        s = logits(model, shared)
        if top_k:
            peer_term = forward_kl(s, topk_targets(o_shared, top_k, T), mask.bool(), T)
        else:
            peer_term = ref_forward_kl(s, o_shared, mask, T)
        kd = alpha * (1 - tw) * peer_term + alpha * tw * ref_forward_kl(s, t_shared, mask, T)
        b = own[0]
        ce = torch.nn.functional.cross_entropy(logits(model, b).double().flatten(0, 1), b.targets.flatten(),
                                               reduction="sum")
        ref = kd / mask.sum() + (1 - alpha) * ce / (b.targets != -100).sum()
        model.zero_grad()
        ref.backward()
        assert got[r]["loss"] == pytest.approx(ref.item(), rel=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[r]["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # weight exchange
    for j in range(2):
        moved = perturbed(setup(str(teacher_dir), str(chat_file), top_k)[2][j], j).state_dict()
        for r in range(2):
            assert_identical(got[r]["copies"][j], moved)
        assert_identical(got[j]["snapshot"], moved)


@pytest.mark.parametrize("teacher", ["live", "cache"])
def test_predictions_mode_run_under_two_processes(tmp_path, teacher_dir, chat_file, teacher):
    """cache: the teacher term (on the shared batch) read from a cache on each process."""
    out, more = tmp_path / "pred", []
    if teacher == "cache":
        r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={chat_file}", "data.seq_len=64",
                    "cache.top_k=16", f"cache.path={tmp_path / 'c'}", "--no-progress")
        assert r.returncode == 0, r.stderr
        more = ["teacher.kind=cache", f"teacher.cache={tmp_path / 'c'}", "codistill.teacher_weight=0.5"]
    cfg = write_config(tmp_path / "c.yaml", teacher_dir, chat_file, out,
                       codistill={"mode": "predictions", "top_k": 8, "burn_in": 1})
    launch(2, "-m", "stillroom", "codistill", cfg, *more, "--no-progress")
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["mode"] == "predictions"
    assert set(metrics["eval"]) == {"teacher", "a before", "b before", "a after", "b after", "ensemble after"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["peer_terms"] for x in lines] == [False, True, True]
    assert all(set(x["loss"]) == set(x["lr"]) == set(x["grad_norm"]) == {"a", "b"} for x in lines)
    for name in ("a", "b"):
        assert (out / "final" / name / "model.safetensors").is_file()


def test_weights_mode_resumes_exactly_under_two_processes(tmp_path, teacher_dir, chat_file):
    """Resume at step 3 of 5 with exchanges every 2 steps: the stale copies come back from the
    checkpoint (not re-exchanged), and both peers end bit-identical to an uninterrupted run."""
    a, b = tmp_path / "a", tmp_path / "b"
    sections = dict(codistill={"mode": "weights", "exchange_every": 2},
                    train={"max_steps": 5, "save_every": 3, "log_every": 1, "lr": 3e-3, "warmup_steps": 1,
                           "batch_size": 4, "output_dir": str(a)})
    launch(2, "-m", "stillroom", "codistill", write_config(tmp_path / "a.yaml", teacher_dir, chat_file, a, **sections),
           "--no-progress")
    sections["train"]["output_dir"] = str(b)
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_0000003", b / "checkpoints" / "step_0000003")
    launch(2, "-m", "stillroom", "codistill", write_config(tmp_path / "b.yaml", teacher_dir, chat_file, b, **sections),
           "--resume", "--no-progress")
    for name in ("a", "b"):
        assert_identical(peer_weights(a, name), peer_weights(b, name))
    assert json.loads((a / "final" / "metrics.json").read_text())["mode"] == "weights"


def test_hard_label_mutual_run(tmp_path, teacher_dir, chat_file):
    out = tmp_path / "hard"
    result = codistill(load(write_config(tmp_path / "c.yaml", teacher_dir, chat_file, out,
                                         loss={"kind": "hard", "alpha": 0.5})), progress=False)
    cols = result["eval"]
    assert cols["b after"]["perplexity"] < cols["b before"]["perplexity"]


def test_mutual_mode_two_processes_equal_one(tmp_path, teacher_dir, chat_file):
    """mode=mutual under 2 processes is data-parallel: the same peers as one process taking the
    same global batch as 2 micro-batches. In fp32: under bf16 autocast a half batch's matmuls round
    differently from the whole one's."""
    two, one = tmp_path / "two", tmp_path / "one"
    launch(2, "-m", "stillroom", "codistill", write_config(tmp_path / "two.yaml", teacher_dir, chat_file, two),
           "train.mixed_precision=no", "--no-progress")
    codistill(load(write_config(tmp_path / "one.yaml", teacher_dir, chat_file, one),
                   ["train.grad_accum=2", "train.mixed_precision=no"]), progress=False)
    for name in ("a", "b"):
        w2, w1 = peer_weights(two, name), peer_weights(one, name)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_cached_teacher_term_trains_the_peers_the_live_teacher_does(tmp_path, teacher_dir, chat_file):
    """teacher.kind=cache in co-distillation: with k = the vocabulary in float32 its teacher term is
    the dense one, so the peers end as with the live teacher (to rounding); the table says where
    the teacher was read from, and the teacher's perplexity is the same."""
    from stillroom.models import core as models

    V = models.logits_width(models.load(str(teacher_dir)).model)
    r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={chat_file}", "data.seq_len=64",
                f"cache.top_k={V}", "cache.dtype=float32", "teacher.dtype=float32", f"cache.path={tmp_path / 'c'}",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    over = ["codistill.teacher_weight=0.5", "teacher.dtype=float32", "train.mixed_precision=no"]
    live = codistill(load(write_config(tmp_path / "l.yaml", teacher_dir, chat_file, tmp_path / "live"), over),
                     progress=False)
    cached = codistill(load(write_config(tmp_path / "c.yaml", teacher_dir, chat_file, tmp_path / "cached"),
                            over + ["teacher.kind=cache", f"teacher.cache={tmp_path / 'c'}"]), progress=False)
    for name in ("a", "b"):
        a, b = peer_weights(tmp_path / "live", name), peer_weights(tmp_path / "cached", name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert cached["eval"]["teacher"]["perplexity"] == pytest.approx(live["eval"]["teacher"]["perplexity"], rel=1e-5)
    assert f"read from the top-{V} cache" in cached["table"]
    assert cached["eval"]["a after"]["perplexity"] == pytest.approx(live["eval"]["a after"]["perplexity"], rel=1e-3)
