"""A served teacher (teacher.kind=served): a fake vLLM server backed by the tiny teacher answers
/v1/completions with prompt_logprobs (and the legacy echo + logprobs shape) as vLLM and llama.cpp
do; the targets it gives must be the local teacher's, in `stillroom cache` and in a live run."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from stillroom.models import core as models

from conftest import run_cli, tiny_overrides

K = 6


class Fake:
    """What the fake server does: `shape` (prompt_logprobs | echo), and failures to play."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.shape, self.fail, self.status, self.requests = "prompt_logprobs", 0, 500, 0
        self.garble, self.shift, self.delay, self.temp = False, 0, 0.0, 1.0
        self.lock = threading.Lock()

    def logp(self, ids):
        with self.lock, torch.no_grad():
            return torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float() / self.temp, -1)

    def answer(self, req):
        if self.shape == "prompt_logprobs":
            ids, k = req["prompt"], req.get("prompt_logprobs")
            if not isinstance(ids, list) or k is None:
                return {"choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]}
            lp, entries = self.logp(ids), [None]
            for i in range(1, len(ids)):
                v, t = lp[i - 1].topk(k)
                e = {str(int(a)): {"logprob": float(b), "rank": r + 1, "decoded_token": "x"}
                     for r, (b, a) in enumerate(zip(v, t))}
                if str(ids[i]) not in e:   # vLLM adds the realized token with its own rank
                    e[str(ids[i])] = {"logprob": float(lp[i - 1, ids[i]]), "rank": int((lp[i - 1] > lp[i - 1, ids[i]]).sum()) + 1,
                                      "decoded_token": "x"}
                entries.append(e)
            return {"choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None,
                                 "prompt_logprobs": None if self.garble else entries}]}
        text, k = req["prompt"], req["logprobs"]
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        lp = self.logp(ids)
        tokens = [self.tok.decode([t]) for t in ids]
        own, tops = [None], [None]
        for i in range(1, len(ids)):
            v, t = lp[i - 1].topk(k)
            tops.append({self.tok.decode([int(a)]): float(b) for b, a in zip(v, t)})
            own.append(float(lp[i - 1, ids[i]]))
        return {"choices": [{"index": 0, "text": text, "finish_reason": "length",
                             "logprobs": {"tokens": tokens, "token_logprobs": own, "top_logprobs": tops,
                                          "text_offset": [0] * len(ids)}}]}


@pytest.fixture(scope="module")
def server(teacher_dir):
    t = models.load(str(teacher_dir), dtype=torch.float32)
    fake = Fake(t.model, t.tokenizer)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":   # vLLM's: the server's own tokens for a text
                ids = fake.tok(req["prompt"], add_special_tokens=False)["input_ids"]
                return self.reply({"tokens": [(t + fake.shift) % len(fake.tok) for t in ids]})
            time.sleep(fake.delay)
            with fake.lock:
                fake.requests += 1
                failing = fake.fail > 0
                fake.fail -= failing
            if failing:
                self.send_response(fake.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            self.reply({"id": "c", "object": "text_completion", "created": 0, "model": req["model"],
                        **fake.answer(req)})

        def reply(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()


@pytest.fixture
def fresh(server):
    server.shape, server.fail, server.status, server.garble, server.shift = "prompt_logprobs", 0, 500, False, 0
    server.delay, server.temp = 0.0, 1.0
    return server


def served(server, *more):
    return ["teacher.kind=served", f"teacher.served.url={server.url}", f"teacher.served.top_k={K}",
            "teacher.served.retries=0", *more]


def cache_rows(path):
    index = json.loads((path / "index.json").read_text())
    out = {}
    for sh in index["shards"]:
        t = load_file(str(path / sh["file"]))
        row = 0
        for sid, n in sh["samples"]:
            out[sid] = {k: t[k][row:row + n] for k in ("ids", "logp", "tail", "label_logp")}
            row += n
    return index, out


@pytest.mark.parametrize("shape", ["prompt_logprobs", "echo"])
def test_a_cache_from_a_served_teacher_equals_the_local_teachers(tmp_path, teacher_dir, chat_file, fresh, shape):
    fresh.shape = shape
    base = tiny_overrides(teacher_dir, chat_file, tmp_path / "unused") + ["teacher.dtype=float32",
                                                                          "cache.dtype=float32"]
    r = run_cli("cache", *base, f"cache.path={tmp_path / 'local'}", f"cache.top_k={K}")
    assert r.returncode == 0, r.stderr
    r = run_cli("cache", *base, *served(fresh, f"teacher.served.api={shape}"), f"cache.path={tmp_path / 'served'}")
    assert r.returncode == 0, r.stderr
    (_, a), (ib, b) = cache_rows(tmp_path / "local"), cache_rows(tmp_path / "served")
    assert ib["complete"] and ib["top_k"] == K and "served" in ib["source"]
    assert set(a) == set(b) and len(a) > 10
    matched = total = 0
    for sid in a:
        x, y = a[sid], b[sid]
        if shape == "prompt_logprobs":   # ids by rank: the same, in the same order
            assert torch.equal(x["ids"].long(), y["ids"].long()), sid
            torch.testing.assert_close(x["logp"], y["logp"], atol=2e-5, rtol=0)
            torch.testing.assert_close(x["tail"].exp(), y["tail"].exp(), atol=2e-5, rtol=0)
        else:   # ids read back from their text: those whose text is one id's (the rest is tail mass),
            for r in range(len(x["ids"])):   # plus the true token, each with the local log-prob
                mine = {int(i): float(v) for i, v in zip(x["ids"][r], x["logp"][r])}
                got = {int(i): float(v) for i, v in zip(y["ids"][r], y["logp"][r]) if v > float("-inf")}
                extra = [i for i in got if i not in mine]
                assert len(extra) <= 1 and all(abs(mine[i] - v) < 2e-5 for i, v in got.items() if i in mine)
                if extra:
                    assert abs(got[extra[0]] - float(x["label_logp"][r])) < 2e-5
                mass = sum(torch.tensor(list(got.values())).exp()) + y["tail"][r].exp()
                assert abs(float(mass) - 1) < 1e-4
                matched += sum(i in mine for i in got)
                total += len(mine)
        torch.testing.assert_close(x["label_logp"], y["label_logp"], atol=2e-5, rtol=0)
    if shape == "echo":
        assert matched > 0.3 * total, (matched, total)   # the tiny byte-level vocabulary: many pieces shared


def test_a_live_run_with_a_served_teacher_equals_one_from_its_cache(tmp_path, teacher_dir, chat_file, fresh):
    """The served teacher's targets in a live run are exactly the rows `stillroom cache` stores from
    the same server (float32), so the two runs end with the same weights, bit for bit."""
    base = tiny_overrides(teacher_dir, chat_file, tmp_path / "x") + ["loss.temperature=1.0", "cache.dtype=float32"]
    r = run_cli("cache", *base, *served(fresh), f"cache.path={tmp_path / 'c'}")
    assert r.returncode == 0, r.stderr
    runs = {}
    for name, more in (("served", served(fresh)), ("cache", ["teacher.kind=cache", f"teacher.cache={tmp_path / 'c'}"])):
        out = tmp_path / name
        r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, out), "loss.temperature=1.0", *more)
        assert r.returncode == 0, r.stderr
        runs[name] = load_file(str(out / "final" / "model.safetensors"))
        if name == "served":
            assert "served at" in r.stderr and "scored by the server" in r.stdout
            assert "HTTP Request" not in r.stderr   # not a line per request
            assert r.stderr.count("probe scored") == 1, r.stderr   # checked early and again: probed once
    assert runs["served"].keys() == runs["cache"].keys()
    for k in runs["served"]:
        assert torch.equal(runs["served"][k], runs["cache"][k]), k


def test_a_codistill_with_a_served_teacher_equals_one_from_its_cache(tmp_path, teacher_dir, chat_file, fresh):
    """Co-distillation's teacher term from the server: the same peers, bit for bit, as from the
    cache `stillroom cache` stores from the same server; a served teacher without data.path, or at
    another temperature, is refused in one line."""
    from conftest import peer_weights, write_config

    base = tiny_overrides(teacher_dir, chat_file, tmp_path / "x") + ["loss.temperature=1.0", "cache.dtype=float32"]
    assert run_cli("cache", *base, *served(fresh), f"cache.path={tmp_path / 'c'}").returncode == 0
    for name, more in (("served", served(fresh)), ("cache", ["teacher.kind=cache", f"teacher.cache={tmp_path / 'c'}"])):
        cfg = write_config(tmp_path / f"{name}.yaml", teacher_dir, chat_file, tmp_path / name)
        r = run_cli("codistill", cfg, "codistill.teacher_weight=0.5", "train.max_steps=2", *more, "--no-progress")
        assert r.returncode == 0, r.stderr
        if name == "served":
            assert "scored by the server" in r.stdout
    for peer in ("a", "b"):
        a, b = peer_weights(tmp_path / "served", peer), peer_weights(tmp_path / "cache", peer)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = write_config(tmp_path / "bad.yaml", teacher_dir, chat_file, tmp_path / "bad")
    for more, says in ((["data.path=null"], "set data.path"), (["loss.temperature=2.0"], "set loss.temperature=1")):
        r = run_cli("codistill", cfg, *served(fresh), *more)
        assert r.returncode == 2 and says in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "bad").exists()


def test_a_failing_request_is_retried(tmp_path, teacher_dir, chat_file, fresh):
    fresh.fail, fresh.status = 2, 503
    r = run_cli("cache", *tiny_overrides(teacher_dir, chat_file, tmp_path / "x"), "data.max_examples=4",
                *served(fresh)[:-1], "teacher.served.retries=3", f"cache.path={tmp_path / 'c'}")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case", ["down", "500", "garbled", "other tokenizer", "temperature", "no url"])
def test_a_served_teacher_that_cannot_serve_is_one_line(tmp_path, teacher_dir, chat_file, fresh, case):
    more = served(fresh)
    if case == "down":
        more = ["teacher.kind=served", "teacher.served.url=http://127.0.0.1:9/v1", "teacher.served.retries=0",
                "teacher.served.timeout=5"]
    elif case == "500":
        fresh.fail = 10**6
    elif case == "garbled":
        fresh.garble = True
        more.append("teacher.served.api=prompt_logprobs")
    elif case == "other tokenizer":
        fresh.shift = 7   # its /tokenize says another tokenizer
    elif case == "temperature":
        more.append("loss.temperature=2.0")
    elif case == "no url":
        more = ["teacher.kind=served"]
    out = tmp_path / "run"
    r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, out), *more)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.startswith("stillroom: error")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    expect = {"down": "cannot reach the served teacher", "500": "answered 500", "garbled": "prompt_logprobs",
              "other tokenizer": "tokeniz", "temperature": "loss.temperature", "no url": "teacher.served.url"}[case]
    assert expect in lines[0], lines[0]
    assert not (out / "final").exists()


def test_a_server_that_does_not_keep_up_is_said_in_the_log(tmp_path, teacher_dir, chat_file, fresh):
    fresh.delay = 0.15   # one request at a time: each step waits for its batch
    r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "run"), "loss.temperature=1.0",
                *served(fresh), "teacher.served.concurrency=1", "train.max_steps=4")
    assert r.returncode == 0, r.stderr
    assert "a served teacher does not keep up" in r.stderr



def test_a_cache_from_a_server_killed_midway_continues(tmp_path, teacher_dir, chat_file, fresh):
    import signal

    def args(path):
        return ["cache", *tiny_overrides(teacher_dir, chat_file, tmp_path / "unused"), *served(fresh),
                f"cache.path={path}", "cache.shard_rows=30", "cache.batch_size=4", "cache.dtype=float32"]
    assert run_cli(*args(tmp_path / "ref")).returncode == 0
    r = run_cli(*args(tmp_path / "c"), env={"STILLROOM_FAULT": "cache.batch:3"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    asked, kept = fresh.requests, len(cache_rows(tmp_path / "c")[1])
    assert kept > 0
    r = run_cli(*args(tmp_path / "c"))   # the same command continues where it stopped
    assert r.returncode == 0, r.stderr[-2000:]
    (_, ref), (index, got) = cache_rows(tmp_path / "ref"), cache_rows(tmp_path / "c")
    assert index["complete"] and ref.keys() == got.keys()
    for sid in ref:
        assert all(torch.equal(ref[sid][k], got[sid][k]) for k in ref[sid]), sid
    assert fresh.requests - asked == 1 + len(ref) - kept   # the probe, and the samples not yet listed


def test_a_cache_from_a_server_split_over_two_processes_equals_one_process(tmp_path, teacher_dir, chat_file, fresh):
    """`accelerate launch ... stillroom cache` with a served teacher: each process sends its own
    batches' requests and writes its own shards; the folded cache holds every sample's rows as the
    one-process cache does, bit for bit, and each sample was asked for once."""
    from conftest import launch

    def args(path):
        return ["cache", *tiny_overrides(teacher_dir, chat_file, tmp_path / "unused"), *served(fresh),
                f"cache.path={path}", "cache.shard_rows=30", "cache.batch_size=4", "cache.dtype=float32", "--no-progress"]
    assert run_cli(*args(tmp_path / "one")).returncode == 0
    asked = fresh.requests
    r = launch(2, "-m", "stillroom", *args(tmp_path / "two"))
    assert "HTTP Request" not in r.stderr   # the client's own request lines stay quiet
    (_, one), (index, two) = cache_rows(tmp_path / "one"), cache_rows(tmp_path / "two")
    assert index["complete"] and one.keys() == two.keys() and len(one) > 10
    assert {sh["file"].split("-")[1] for sh in index["shards"]} == {"p0", "p1"}
    for sid in one:
        assert all(torch.equal(one[sid][k], two[sid][k]) for k in one[sid]), sid
    assert fresh.requests - asked - len(one) <= 2   # every sample once, plus each process's probe


@pytest.mark.parametrize("temp", [1.0, 1.5])
def test_served_check_says_whether_the_server_serves_the_same_model(tmp_path, teacher_dir, chat_file, fresh, temp):
    """`stillroom served-check` against the local teacher: the same model (exactly: the fake server
    runs it) and one served at another temperature (a silent mismatch, as a wrong dtype or template)."""
    fresh.temp = temp
    r = run_cli("served-check", "--url", fresh.url, "--teacher", teacher_dir, "--data", chat_file, "--rows", "5",
                "--top-k", str(K), "--seq-len", "64", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["rows"] == 5 and got["positions"] > 20 and not got["rows_tokenized_otherwise"]
    if temp == 1.0:
        assert got["top1_agreement"] == 1.0 and got["kl_per_position"] < 1e-5
        assert got["max_logprob_diff"]["value"] < 1e-4 and got["true_token_logprob_diff"] < 1e-4
    else:
        assert got["kl_per_position"] > 0.05 and got["max_logprob_diff"]["value"] > 0.1
    r = run_cli("served-check", "--url", fresh.url, "--teacher", teacher_dir, "--data", chat_file, "--rows", "5",
                "--top-k", str(K), "--seq-len", "64", "--no-progress")
    assert ("the same model" if temp == 1.0 else "they differ") in r.stdout, r.stdout


def test_served_check_flags_are_teacher_served_keys(tmp_path, teacher_dir, chat_file, fresh):
    """served-check's server flags come from teacher.served (help and checks in one place): a bad
    value names the flag, in one line; the retry and concurrency knobs are there too."""
    base = ["served-check", "--teacher", teacher_dir, "--data", chat_file, "--rows", "2", "--seq-len", "64",
            "--no-progress"]
    for more, says in ((["--url", fresh.url, "--top-k", "0"], "--top-k"), ([], "needs --url"),
                       (["--url", fresh.url, "--timeout", "-1"], "--timeout")):
        r = run_cli(*base, *more)
        assert r.returncode == 2 and says in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    r = run_cli(*base, "--url", fresh.url, "--top-k", str(K), "--concurrency", "2", "--retries", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rows"] == 2, r.stderr
    assert "Greater than or equal" not in run_cli("served-check", "--help").stdout   # help is the key's doc


def vllm_capture(model, tok, path, k=K, rows=12):
    """A vLLM prompt_logprobs capture written here from the tiny teacher, as vLLM lays it out (token
    ids as string keys, ranks 1..k, the realized token added with its own rank): not the importer's
    code run backwards."""
    from conftest import CORPUS

    out = []
    for i in range(rows):
        ids = tok(CORPUS[i % len(CORPUS)] + f" {i}", add_special_tokens=False)["input_ids"][:40]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        entries = [None]
        for j in range(1, len(ids)):
            order = lp[j - 1].argsort(descending=True)
            rank = {int(t): r + 1 for r, t in enumerate(order)}
            e = {str(int(t)): {"logprob": float(lp[j - 1, t]), "rank": r + 1, "decoded_token": tok.decode([int(t)])}
                 for r, t in enumerate(order[:k])}
            e.setdefault(str(ids[j]), {"logprob": float(lp[j - 1, ids[j]]), "rank": rank[ids[j]],
                                       "decoded_token": tok.decode([ids[j]])})
            entries.append(e)
        out.append({"prompt_token_ids": ids, "prompt_logprobs": entries})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def test_a_vllm_capture_trains_the_student_its_teacher_would(tmp_path, teacher_dir, fresh):
    """cache.source=vllm reads a capture into a cache whose rows are the local teacher's own cache
    of the same pre-tokenized rows, and a student trained from it ends where one trained from the
    teacher's own cache does (to rounding: the tail is 1 - the listed mass there, a logsumexp here)."""
    t = models.load(str(teacher_dir), dtype=torch.float32)
    cap = vllm_capture(t.model, t.tokenizer, tmp_path / "capture.jsonl")
    base = [f"teacher.model={teacher_dir}", f"data.path={cap}", "data.seq_len=64", "loss.temperature=1.0",
            "cache.dtype=float32", f"cache.top_k={K}", "teacher.dtype=float32", "--no-progress"]
    r = run_cli("cache", *base, "cache.source=vllm", f"cache.path={tmp_path / 'imported'}")
    assert r.returncode == 0, r.stderr
    r = run_cli("cache", *base, f"cache.path={tmp_path / 'own'}")   # the live teacher on the same rows
    assert r.returncode == 0, r.stderr
    (_, a), (index, b) = cache_rows(tmp_path / "own"), cache_rows(tmp_path / "imported")
    assert a.keys() == b.keys() and len(a) == 12 and "vllm" in index["source"]
    for sid in a:
        assert torch.equal(a[sid]["ids"].long(), b[sid]["ids"].long())
        for key in ("logp", "tail", "label_logp"):
            torch.testing.assert_close(a[sid][key].exp(), b[sid][key].exp(), atol=2e-5, rtol=0)
    final = {}
    for name in ("own", "imported"):
        out = tmp_path / f"run-{name}"
        r = run_cli("distill", f"teacher.model={teacher_dir}", "teacher.kind=cache", f"teacher.cache={tmp_path / name}",
                    "data.seq_len=64", "loss.temperature=1.0", "student.num_layers=2", "train.max_steps=3",
                    "train.batch_size=2", "eval.gen_prompts=1", "eval.gen_tokens=2", f"train.output_dir={out}",
                    "--no-progress")
        assert r.returncode == 0, r.stderr
        final[name] = load_file(str(out / "final" / "model.safetensors"))
    for k in final["own"]:
        torch.testing.assert_close(final["own"][k], final["imported"][k], atol=1e-4, rtol=1e-4)


def axolotl_capture(vllm_path, path, layout):
    """The same capture in axolotl's KD layouts, written from the vLLM rows: the top-k only (axolotl
    does not add the realized token), right-aligned to the end of input_ids. v2: rows for tokens
    1..n-1 (target_token_ids + float logprobs); legacy: rows for tokens 0..n-1 (row 0 describes
    nothing a student predicts), {"token": "token_id:<id>", "logprob"} entries."""
    out = []
    for row in map(json.loads, vllm_path.read_text().splitlines()):
        top = [sorted(((int(t), v["logprob"]) for t, v in e.items() if v["rank"] <= K), key=lambda x: -x[1])
               for e in row["prompt_logprobs"][1:]]
        if layout == "v2":
            out.append({"input_ids": row["prompt_token_ids"], "target_token_ids": [[t for t, _ in r] for r in top],
                        "logprobs": [[v for _, v in r] for r in top]})
        else:
            rows = [[{"token": "token_id:0", "logprob": 0.0}]] + [[{"token": f"token_id:{t}", "logprob": v}
                                                                     for t, v in r] for r in top]
            out.append({"input_ids": row["prompt_token_ids"], "logprobs": rows})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


@pytest.mark.parametrize("layout", ["v2", "legacy"])
def test_an_axolotl_kd_dataset_imports_to_the_vllm_captures_cache(tmp_path, teacher_dir, layout):
    """cache.source=axolotl reads axolotl's KD rows (both layouts) into the cache the same capture
    gives as vLLM rows: the same ids, log-probs and tail; the true token's log-prob where the top-k
    lists it, else no more than the tail's mass (axolotl's rows do not carry it)."""
    t = models.load(str(teacher_dir), dtype=torch.float32)
    cap = vllm_capture(t.model, t.tokenizer, tmp_path / "capture.jsonl")
    axo = axolotl_capture(cap, tmp_path / "axolotl.jsonl", layout)
    base = [f"teacher.model={teacher_dir}", "data.seq_len=64", "cache.dtype=float32", f"cache.top_k={K}",
            "--no-progress"]
    for src, path in (("vllm", cap), ("axolotl", axo)):
        r = run_cli("cache", *base, f"data.path={path}", f"cache.source={src}", f"cache.path={tmp_path / src}")
        assert r.returncode == 0, r.stderr
    (_, a), (index, b) = cache_rows(tmp_path / "vllm"), cache_rows(tmp_path / "axolotl")
    assert a.keys() == b.keys() and len(a) == 12 and "axolotl" in index["source"]
    listed = 0
    for sid in a:
        assert torch.equal(a[sid]["ids"], b[sid]["ids"]) and torch.equal(a[sid]["logp"], b[sid]["logp"])
        assert torch.equal(a[sid]["tail"], b[sid]["tail"])
        inside = (a[sid]["label_logp"] >= a[sid]["logp"][:, -1])   # the true token is among the top K
        assert torch.equal(a[sid]["label_logp"][inside], b[sid]["label_logp"][inside])
        assert (b[sid]["label_logp"][~inside] >= a[sid]["label_logp"][~inside]).all()
        listed += int(inside.sum())
    assert 0 < listed < sum(len(v["ids"]) for v in a.values())   # both cases occur


def test_an_axolotl_row_it_cannot_read_is_one_line(tmp_path, teacher_dir):
    t = models.load(str(teacher_dir), dtype=torch.float32)
    axo = axolotl_capture(vllm_capture(t.model, t.tokenizer, tmp_path / "capture.jsonl", rows=3),
                          tmp_path / "axolotl.jsonl", "v2")
    rows = [json.loads(x) for x in axo.read_text().splitlines()]
    rows[1]["target_token_ids"] = rows[1]["target_token_ids"][:-2]   # the file's row 2
    axo.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={axo}", "cache.source=axolotl",
                f"cache.path={tmp_path / 'c'}", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("stillroom: error")]
    assert len(line) == 1 and "row 2: target_token_ids has" in line[0], r.stderr


@pytest.mark.parametrize("case", ["no logprobs", "other tokenizer", "short", "pack"])
def test_a_capture_that_cannot_be_read_is_one_line(tmp_path, teacher_dir, case):
    t = models.load(str(teacher_dir), dtype=torch.float32)
    cap = vllm_capture(t.model, t.tokenizer, tmp_path / "capture.jsonl", rows=3)
    rows = [json.loads(x) for x in cap.read_text().splitlines()]
    more = []
    if case == "no logprobs":
        del rows[1]["prompt_logprobs"]
    elif case == "other tokenizer":
        rows[2]["prompt_token_ids"][3] = 10**6
    elif case == "short":
        rows[0]["prompt_logprobs"] = rows[0]["prompt_logprobs"][:4]
    else:
        more = ["data.pack=true"]
    cap.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={cap}", "cache.source=vllm",
                f"cache.path={tmp_path / 'c'}", "--no-progress", *more)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("stillroom: error")]
    assert len(line) == 1, r.stderr
    assert {"no logprobs": "prompt_logprobs", "other tokenizer": "vocabulary", "short": "prompt_logprobs for 4",
            "pack": "data.pack=false"}[case] in line[0], line[0]


@pytest.mark.parametrize("fmt", ["vllm", "axolotl", "distillkit"])
def test_a_cache_exported_as_a_capture_reads_back_the_same(tmp_path, teacher_dir, chat_file, fmt):
    """stillroom's own cache -> a vLLM capture (or axolotl's KD layout, or DistillKit's parquet) -> a
    cache again: the same ids and log-probs bit for bit, the tail recomputed from the listed mass
    (to rounding), the true token's log-prob (axolotl, DistillKit: where the top-k lists it; their
    rows do not carry it elsewhere); exported again, the same files byte for byte; an existing
    capture is not replaced."""
    base = tiny_overrides(teacher_dir, chat_file, tmp_path / "unused") + [
        "loss.temperature=1.0", "cache.dtype=float32", f"cache.top_k={K}", "teacher.dtype=float32"]
    assert run_cli("cache", *base, f"cache.path={tmp_path / 'own'}").returncode == 0
    own = ["teacher.kind=cache", f"teacher.cache={tmp_path / 'own'}"]
    capture, again = (tmp_path / "capture", tmp_path / "again") if fmt == "distillkit" else \
        (tmp_path / "capture.jsonl", tmp_path / "again.jsonl")
    r = run_cli("cache", *base, *own, f"--export-{fmt}", capture)
    assert r.returncode == 0 and {"vllm": "vLLM prompt_logprobs", "axolotl": "axolotl KD",
                                  "distillkit": "DistillKit"}[fmt] in r.stdout, r.stderr
    if fmt == "axolotl":   # a row per token 1..n-1, right-aligned
        row = json.loads(capture.read_text().splitlines()[0])
        assert len(row["logprobs"]) == len(row["target_token_ids"]) == len(row["input_ids"]) - 1
    if fmt == "distillkit":   # parquet as DistillKit writes it: L - 1 byte rows a sequence
        import pyarrow.parquet as pq
        t = pq.read_table(capture / "data_0.parquet")
        assert t.column_names == ["input_ids", "compressed_logprobs", "bytepacked_indices"]
        row = t.slice(0, 1).to_pylist()[0]
        assert len(row["compressed_logprobs"]) == len(row["bytepacked_indices"]) == len(row["input_ids"]) - 1
        assert (capture / "compression_config.yaml").is_file()
    r = run_cli("cache", f"teacher.model={teacher_dir}", f"data.path={capture}", "data.seq_len=64",
                f"cache.source={fmt}", "cache.dtype=float32", f"cache.top_k={K}", f"cache.path={tmp_path / 'back'}",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    (_, a), (_, b) = cache_rows(tmp_path / "own"), cache_rows(tmp_path / "back")
    assert a.keys() == b.keys() and len(a) > 10
    for sid in a:
        assert torch.equal(a[sid]["ids"].long(), b[sid]["ids"].long()) and torch.equal(a[sid]["logp"], b[sid]["logp"])
        torch.testing.assert_close(a[sid]["tail"].exp(), b[sid]["tail"].exp(), atol=2e-6, rtol=0)
        inside = a[sid]["label_logp"] >= a[sid]["logp"][:, -1] if fmt != "vllm" else slice(None)
        assert torch.equal(a[sid]["label_logp"][inside], b[sid]["label_logp"][inside])
    r = run_cli("cache", f"teacher.model={teacher_dir}", "teacher.kind=cache", f"teacher.cache={tmp_path / 'back'}",
                "data.seq_len=64", f"--export-{fmt}", again, "--no-progress")
    assert r.returncode == 0, r.stderr
    if fmt == "distillkit":
        assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in capture.iterdir())
        assert all((again / p.name).read_bytes() == p.read_bytes() for p in capture.iterdir())
    else:
        assert again.read_bytes() == capture.read_bytes()
    r = run_cli("cache", *base, *own, f"--export-{fmt}", capture)   # exists: refused
    assert r.returncode == 2 and "--overwrite" in r.stderr
