"""API teachers: top-logprobs rows -> a teacher cache on the student's tokenization, and the client
against a real OpenAI-compatible server (llama.cpp's, through llama-cpp-python) when installed."""
import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from stillroom.recipes import load_config
from stillroom.data.examples import Example
from stillroom.data.render import render_chat
from stillroom.losses import topk_targets
from stillroom.models import core as models
from stillroom.teachers.api import _pieces, build_from_logprobs
from stillroom.teachers.cache import TeacherCache, positions, summary

from conftest import CORPUS, reply_chat_completion, run_cli, tiny_overrides


def endpoint_rows(teacher, tok, K=5):
    """What an endpoint serving `teacher` returns with top_logprobs=K: per answer token its text,
    log-prob and top-K alternatives (computed here by teacher forcing on the rendered chat)."""
    rows = []
    for i in range(6):
        msgs = [{"role": "user", "content": f"Say something about cat {i}."},
                {"role": "assistant", "content": CORPUS[i]}]
        ids, labels = render_chat(tok, msgs)
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        answer = [j for j, y in enumerate(labels) if y != -100]
        answer = answer[:len(tok(CORPUS[i], add_special_tokens=False)["input_ids"])]  # the text, not <|im_end|>
        lp = []
        for j in answer:
            v, top = logp[j - 1].topk(K)
            lp.append({"token": tok.decode([ids[j]]), "logprob": float(logp[j - 1, ids[j]]),
                       "top": [[tok.decode([int(t)]), float(x)] for x, t in zip(v, top)]})
        rows.append({"messages": msgs, "teacher_logprobs": lp})
    return rows


@pytest.mark.parametrize("dtype", ["float16", "packed"])
def test_a_logprobs_cache_is_stored_as_cache_dtype_says(tmp_path, teacher_dir, dtype):
    """cache.dtype holds for a cache built from an API's logprobs too (it was always float32):
    the same listed tokens, the top-1 exact, the tail to rounding, and fewer bytes than float32."""
    t = models.load(str(teacher_dir))
    data = tmp_path / "api.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in endpoint_rows(t.model, t.tokenizer)))
    caches = {}
    for d in ("float32", dtype):
        cfg = load_config(None, [f"teacher.model={teacher_dir}", f"data.path={data}", "data.seq_len=256",
                                 f"cache.path={tmp_path / d}", "cache.source=logprobs", "cache.top_k=8",
                                 f"cache.dtype={d}"])
        assert build_from_logprobs(cfg, t.tokenizer, progress=False)["dtype"] == d
        caches[d] = TeacherCache(tmp_path / d)
    a, b = caches["float32"], caches[dtype]
    for sid in a.where:
        ids, lp, tail, label = a.read(sid)
        pids, plp, ptail, plabel = b.read(sid)
        listed, plisted = torch.isfinite(lp), torch.isfinite(plp)
        assert torch.equal(listed.sum(1), plisted.sum(1))
        for r in range(len(ids)):
            assert set(ids[r][listed[r]].tolist()) == set(pids[r][plisted[r]].tolist())
        top = lp.argmax(1, keepdim=True)
        assert torch.equal(ids.long().gather(1, top), pids.long().gather(1, plp.argmax(1, keepdim=True)))
        torch.testing.assert_close(ptail.float(), tail.float(), rtol=1e-2, atol=1e-2)
    assert summary(tmp_path / dtype)["bytes_per_token"] < summary(tmp_path / "float32")["bytes_per_token"]


def test_logprobs_rows_become_a_cache_on_the_students_tokens(tmp_path, teacher_dir):
    t = models.load(str(teacher_dir))
    rows = endpoint_rows(t.model, t.tokenizer)
    rows[5]["teacher_logprobs"][0]["token"] = "not the same split"  # one row that does not align
    data = tmp_path / "api.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"teacher.model={teacher_dir}", f"data.path={data}", "data.seq_len=256",
                             f"cache.path={tmp_path / 'c'}", "cache.source=logprobs", "cache.top_k=8",
                             "cache.dtype=float32"])   # exact values: the alignment is what this checks
    index = build_from_logprobs(cfg, t.tokenizer, progress=False)
    assert index["logprobs"]["rows"] == 6 and index["logprobs"]["aligned"] == 5
    cache = TeacherCache(tmp_path / "c")
    unique = set(_pieces(t.tokenizer).values())  # ids whose text no other id shares (the rest: tail bucket)
    checked = 0
    for n, r in enumerate(rows):
        ids, labels = render_chat(t.tokenizer, r["messages"])
        e = Example(ids, labels)
        got = cache.targets([e], len(ids), "cpu")
        with torch.no_grad():
            live = topk_targets(t.model(input_ids=torch.tensor([ids])).logits, 5)
        n_soft = len(r["teacher_logprobs"])
        for row, p in enumerate(positions(e)):
            g_ids, g_logp = got.top.ids[0, p], got.top.logp[0, p]
            listed = torch.isfinite(g_logp)
            if n < 5 and row < n_soft:   # soft: the endpoint's top-5 (+ the sampled token), same ids
                expect = {tid: v for tid, v in zip(live.ids[0, p].tolist(), live.logp[0, p].tolist())
                          if tid in unique}
                assert set(g_ids[listed].tolist()) >= set(expect)
                checked += len(expect)
                top = dict(zip(g_ids[listed].tolist(), g_logp[listed].tolist()))
                for tid, v in expect.items():
                    assert top[tid] == pytest.approx(v, abs=1e-5)
                assert float(got.top.log_tail[0, p]) == pytest.approx(
                    float(torch.log1p(-torch.tensor(list(top.values())).exp().sum())), abs=1e-4)
            else:                        # hard: all mass on the true next token
                assert listed.sum() == 1 and int(g_ids[listed][0]) == labels[p + 1]
    assert checked > 20
    # and a student trains from it
    out = tmp_path / "run"
    r = run_cli("distill", *tiny_overrides(teacher_dir, data, out), "teacher.kind=cache",
                f"teacher.cache={tmp_path / 'c'}", "data.seq_len=256", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) serving the bundled teacher
    GGUF on loopback. Skipped where the package is not installed (`make test-api` installs it)."""
    import urllib.request

    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed (make test-api)")
    gguf = models.bundled_gguf("smollm2-135m")
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--model_alias", "teacher", "--n_ctx", "2048",
                             "--logits_all", "true", "--n_threads", "2", "--verbose", "false"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("llama server exited; see " + log.name)
            time.sleep(0.5)
    else:
        pytest.fail("llama server did not answer within 2 minutes; see " + log.name)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.real
def test_api_teacher_against_a_real_server(tmp_path, llama_server):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name a colour.\nName a fruit.\nSay hello.\n")
    out = tmp_path / "api.jsonl"
    args = ["generate", "--api", llama_server, "--api-model", "teacher", "--prompts", prompts, "--out", out,
            "--max-new-tokens", "12", "--top-logprobs", "5", "--concurrency", "2", "--no-progress"]
    r = run_cli(*args, "--num-prompts", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(*args)  # continues with the third prompt
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [row["messages"][0]["content"] for row in rows] == ["Name a colour.", "Name a fruit.", "Say hello."]
    assert all(row["teacher_logprobs"] and len(row["teacher_logprobs"][0]["top"]) == 5 for row in rows)
    # the endpoint serves the bundled teacher: its logprobs align with the bundled tokenizer
    r = run_cli("cache", "teacher.model=smollm2-135m", f"data.path={out}", "cache.source=logprobs",
                f"cache.path={tmp_path / 'c'}", "cache.top_k=8", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["logprobs"]["aligned"] >= 2 and index["logprobs"]["soft_positions"] > 0
    # an endpoint that is not there: one line, exit 2, what was written stays
    r = run_cli("generate", "--api", "http://127.0.0.1:9/v1", "--prompts", prompts, "--out", tmp_path / "x.jsonl",
                "--no-progress", "--max-retries", "0")
    assert r.returncode == 2 and "cannot reach the API" in r.stderr, r.stderr[-2000:]


def test_rate_limit_spaces_request_starts(monkeypatch):
    """--rate-limit R: request starts are at least 1/R s apart (a fake clock: no real waiting)."""
    from stillroom.teachers import api

    clock, slept = [100.0], []
    monkeypatch.setattr(api.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(api.time, "sleep", lambda s: slept.append(round(s, 6)))
    teacher = api.ApiTeacher("http://127.0.0.1:9/v1", "m", rate_limit=4.0)
    for _ in range(3):
        teacher._throttle()
    assert slept == [0.25, 0.5]          # the 2nd and 3rd requests wait their turn
    clock[0] += 10.0                      # after a long pause the next one goes at once
    teacher._throttle()
    assert slept == [0.25, 0.5]


def test_a_throttled_endpoint_is_retried(tmp_path):
    """A 429 with Retry-After is retried (by the openai client) and the run goes on."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from stillroom.config import GenerateConfig
    from stillroom.teachers.api import ApiTeacher

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            if len(seen) == 1:
                self.send_response(429)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            reply_chat_completion(self, "Blue.")

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t = ApiTeacher(f"http://127.0.0.1:{server.server_port}/v1", "m", max_retries=2)
        got = t.answer([[{"role": "user", "content": "Name a colour."}]], GenerateConfig(), seed=0)
    finally:
        server.shutdown()
    assert got == [["Blue."]] and len(seen) == 2


@pytest.mark.real
def test_a_served_teacher_scores_text_as_the_local_one(tmp_path, llama_server):
    """teacher.kind=served against llama.cpp's server serving the bundled GGUF (the echo + logprobs
    shape; `auto` finds it): a cache built from the server against one built from the same model
    loaded locally. llama.cpp runs the quantized weights with its own kernels, transformers the
    dequantized ones, so they agree closely, not bit for bit."""
    from safetensors.torch import load_file

    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(CORPUS[:12]))
    base = ["teacher.model=smollm2-135m", f"data.path={data}", "data.seq_len=48", "loss.temperature=1.0",
            "cache.dtype=float32", "--no-progress"]
    r = run_cli("cache", *base, "teacher.dtype=float32", f"cache.path={tmp_path / 'local'}", "cache.top_k=8")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("cache", *base, "teacher.kind=served", f"teacher.served.url={llama_server}",
                "teacher.served.model=teacher", "teacher.served.top_k=8", f"cache.path={tmp_path / 'served'}")
    assert r.returncode == 0, r.stderr[-3000:]
    got = {}
    for name in ("local", "served"):
        shards = json.loads((tmp_path / name / "index.json").read_text())["shards"]
        t = [load_file(str(tmp_path / name / sh["file"])) for sh in shards]
        got[name] = {k: torch.cat([x[k] for x in t]) for k in ("ids", "logp", "label_logp")}
        got[name]["samples"] = [sid for sh in shards for sid, _ in sh["samples"]]
    a, b = got["local"], got["served"]
    assert a["samples"] == b["samples"] and len(a["ids"]) == len(b["ids"]) > 50
    top1 = float((a["ids"][:, 0].long() == b["ids"][:, 0].long()).float().mean())
    # the true token's log-prob is exact where the server listed it (else the tail's mass bounds it)
    listed = (b["logp"] == b["label_logp"][:, None]).any(-1)
    diff = (a["label_logp"] - b["label_logp"])[listed].abs()
    print(f"served vs local: top-1 agreement {top1:.3f} over {len(a['ids'])} positions; the true token's "
          f"log-prob (listed at {int(listed.sum())}) differs by {float(diff.mean()):.4f} nats on average")
    assert top1 > 0.9 and listed.float().mean() > 0.5 and float(diff.mean()) < 0.1
    r = run_cli("served-check", "--url", llama_server, "--served-model", "teacher", "--data", data, "--rows", "8",
                "--top-k", "8", "--seq-len", "48", "--no-progress")
    assert r.returncode == 0 and "the same model within numeric tolerance" in r.stdout, r.stdout + r.stderr[-2000:]
    print(r.stdout)
