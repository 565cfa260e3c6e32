"""Tiny offline fixtures: a byte-level BPE tokenizer trained here, and tiny random Llama models."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent   # tests/: the workers and the zygote live here

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("STILLROOM_TEST_DEVICE", "cpu") == "cpu":
    # The suite targets the CPU: runs (in this process and the commands it starts) do not follow a
    # GPU that happens to be there. STILLROOM_TEST_DEVICE=cuda lets them.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Each run of the suite keeps its own stillroom cache (data stores, the teachers' generated answers):
# a store an earlier run left would be reopened and say so in a line, so what a command prints would
# depend on what ran before. Converted GGUF teachers (half a minute each) are shared with the user's.
# Made once, by the suite's own process: a process it starts that imports conftest (a child script, a
# nested pytest) inherits it, keeps the STILLROOM_CACHE a test gave it, and never removes the folder.
_OWN_CACHE = "STILLROOM_SUITE_CACHE" not in os.environ
if _OWN_CACHE:
    _USER_CACHE = Path(os.environ.get("STILLROOM_CACHE") or Path.home() / ".cache" / "stillroom").expanduser().absolute()
    os.environ["STILLROOM_SUITE_CACHE"] = tempfile.mkdtemp(prefix="stillroom-suite-cache-")
    (_USER_CACHE / "models").mkdir(parents=True, exist_ok=True)
    (Path(os.environ["STILLROOM_SUITE_CACHE"]) / "models").symlink_to(_USER_CACHE / "models", target_is_directory=True)
    os.environ["STILLROOM_CACHE"] = os.environ["STILLROOM_SUITE_CACHE"]
SUITE_CACHE = Path(os.environ["STILLROOM_SUITE_CACHE"])

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CORPUS = [
    "The cat sat on the mat and looked at the moon.",
    "Distillation trains a small student to imitate a large teacher.",
    "A language model predicts the next token from the tokens before it.",
    "Rain falls, rivers run, and the sea is salty because rivers carry minerals.",
    "Numbers: one two three four five six seven eight nine ten.",
    "def add(a, b): return a + b  # a tiny python function",
] * 20


def make_tokenizer(vocab_size=320):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state (the precision among it) that a later
    Accelerator(cpu=True) would inherit: each test starts from none."""
    yield
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()


def make_model(tok, layers=4, hidden=32, heads=4, kv=2, seed=0, vocab=None, init_range=0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=init_range)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def ran(monkeypatch):
    """The names of the compiled loss kernels called in a test (losses/fused.py), so a comparison of
    compiled and eager cannot pass by running eager twice; a compile failure in the test does not
    turn compiling off for the tests after it."""
    from stillroom.losses import fused

    calls, kernel_of = [], fused._kernel

    def spy(name="dense"):
        k = kernel_of(name)
        return lambda *a, **kw: (calls.append(name), k(*a, **kw))[1]

    monkeypatch.setattr(fused, "_kernel", spy)
    monkeypatch.setattr(fused, "_broken", None)
    return calls


def test_device() -> str:
    """The device the device-aware tests build their tensors on: STILLROOM_TEST_DEVICE (cpu, the
    default; cuda on a machine with a GPU: the device check runs the suite so)."""
    return os.environ.get("STILLROOM_TEST_DEVICE", "cpu")


@pytest.fixture
def device():
    """test_device(), skipped where that device is not here."""
    d = test_device()
    if d.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("STILLROOM_TEST_DEVICE=cuda on a machine without CUDA")
    return torch.device(d)


@pytest.fixture
def on_device(device, monkeypatch):
    """The test's tensors on `device`: factory calls (randn, zeros, tensor, ...) and
    torch.Generator() default to it. Nothing changes on the CPU. A module opts in with
    `pytestmark = pytest.mark.usefixtures("on_device")`."""
    if device.type == "cpu":
        yield device
        return
    real = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device_=None, device=device: real(device=device_ or device))
    with device:
        yield device


def on_cpu_only(reason: str):
    """Skip a test whose expectation is a CPU fact (eager teacher attention, bit-exact reruns,
    the CPU's own kernels) where the suite targets another device."""
    return pytest.mark.skipif(test_device() != "cpu", reason=f"a CPU expectation: {reason}")


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tok):
    """A tiny random 4-layer Llama teacher saved as a Hugging Face folder; large init so its
    next-token distributions are far from uniform (a teacher with something to teach)."""
    return save(make_model(tok, init_range=0.3), tok, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = []
    for i in range(40):
        rows.append({"messages": [{"role": "user", "content": f"Tell me about the cat number {i}."},
                                  {"role": "assistant", "content": CORPUS[i % 6]}]})
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, teacher_dir, chat_file):
    """A run folder: a 2-layer student distilled from teacher_dir for 2 steps (for the tests of
    commands that read a trained student: eval's tasks, harness and draft check). Read-only."""
    out = tmp_path_factory.mktemp("student") / "run"
    r = run_cli("distill", f"teacher.model={teacher_dir}", f"data.path={chat_file}", f"train.output_dir={out}",
                "student.num_layers=2", "data.seq_len=64", "train.max_steps=2", "eval.gen_tokens=2",
                "eval.gen_prompts=1", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text("\n".join(CORPUS))
    return p


def tiny_overrides(teacher_dir, data, out, **extra):
    """Dotted overrides that turn any recipe into a seconds-long run on the tiny models."""
    o = {"teacher.model": teacher_dir, "data.path": data, "train.output_dir": out,
         "student.num_layers": 2, "data.seq_len": 64, "train.batch_size": 4, "train.max_steps": 3,
         "train.log_every": 1, "eval.gen_tokens": 4, "eval.gen_prompts": 1, "train.warmup_steps": 1}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


_zygote = None


def stillroom_process(args, env=None, timeout=600):
    """`python -m stillroom ARGS` as its own process -> CompletedProcess. Forked from the tests'
    zygote (tests/zygote.py: torch and transformers imported once, not per command) unless
    STILLROOM_TEST_SUBPROCESS=1 asks for a fresh interpreter each time."""
    global _zygote
    args = [str(a) for a in args]
    if os.environ.get("STILLROOM_TEST_SUBPROCESS") == "1" or not hasattr(os, "fork"):
        return subprocess.run([sys.executable, "-m", "stillroom", *args], capture_output=True, text=True,
                              env=env, timeout=timeout)
    if _zygote is None:
        from zygote import Zygote
        _zygote = Zygote()
    return _zygote.run(args, env=env, timeout=timeout)


def pytest_sessionfinish(session, exitstatus):
    if _zygote is not None:
        _zygote.close()
    if _OWN_CACHE:
        (SUITE_CACHE / "models").unlink(missing_ok=True)   # the link only: the user's converted teachers stay
        shutil.rmtree(SUITE_CACHE, ignore_errors=True)


def run_cli(*args, env=None, timeout=600):
    """Run `python -m stillroom ...` as a user would; returns the CompletedProcess."""
    return stillroom_process(args, env=dict(os.environ, **(env or {})), timeout=timeout)


def reply_chat_completion(handler, content: str):
    """Answer an OpenAI chat-completion request from a BaseHTTPRequestHandler (fake API teachers)."""
    body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


# ------------------------------------------------------------ helpers the test modules share


# the lines that may precede a one-line error: a slow phase's (feedback.phase), and the data line
# of a data store reopened (another test of the run may have built the store for the same data)
PHASE = re.compile(r"stillroom: .* \.\.\.$|stillroom: .*: done in [\d.]+ s$|"
                   r"stillroom: data: .* from the store \S+$")


def assert_user_error(r, pattern):
    """Exit 2 and one error line, the last; before it, at most the lines of phases that ran long
    enough to say what they were doing (feedback.phase: a slow machine may show them)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if not PHASE.match(x)]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("stillroom: error: "), lines
    assert re.search(pattern, lines[0]), lines[0]


def distill_tiny(teacher_dir, data, out, *extra, resume=False, overwrite=False):
    """`distill` in this process on the tiny models (tiny_overrides), extra dotted overrides after them."""
    from stillroom.recipes import load_config
    from stillroom.run.distill import distill

    cfg = load_config(None, tiny_overrides(teacher_dir, data, out) + list(extra))
    return distill(cfg, overwrite=overwrite, resume=resume, progress=False)


def failure(stderr):
    """What a failed launch said: each process's own last lines first (the root cause is often on a
    process whose traceback the launcher's closing report pushes out of a plain tail), then the tail."""
    by_rank = {}
    for ln in stderr.splitlines():
        if ln.startswith("[rank") and "]:" in ln:
            by_rank.setdefault(ln.split("]:")[0], []).append(ln)
    return "\n".join(ln for lines in by_rank.values() for ln in lines[-15:]) + "\n...\n" + stderr[-3000:]


def launch(n, *args, env=None, check=True, timeout=600):
    """`accelerate launch` of n CPU processes (gloo) running ARGS (a script and its arguments);
    tests/ is on their PYTHONPATH. check: the launch must succeed (its failure() in the message)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *map(str, args)]
    # gloo on the CPU, whatever the suite targets: two processes on one GPU machine would ask for cuda:1
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="", **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, failure(r.stderr)
    return r


def peer_weights(out, name):
    """A co-distillation run's final weights of one peer."""
    from safetensors.torch import load_file

    return load_file(Path(out) / "final" / name / "model.safetensors")


def write_config(path, teacher_dir, data, out, **sections):
    """A tiny two-peer config: peer a = 2 of the teacher's layers, peer b = a fresh 2-layer model."""
    import yaml

    cfg = {
        "teacher": {"model": str(teacher_dir)},
        "peers": [{"name": "a", "init": "from_teacher", "num_layers": 2},
                  {"name": "b", "init": "config", "num_layers": 2, "hidden_size": 32, "num_heads": 4}],
        "data": {"path": str(data), "seq_len": 64},
        "loss": {"alpha": 0.5},
        "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 4, "log_every": 1, "lr": 3e-3,
                  "warmup_steps": 1},
        "eval": {"gen_tokens": 4, "gen_prompts": 1},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_cache(teacher_dir, data, cache_dir, *extra):
    """A top-k cache of the tiny teacher over `data` (cfg_for's config) -> (cfg, teacher, train, held)."""
    from stillroom.data.store import load_data
    from stillroom.models import core as models
    from stillroom.teachers.cache import build

    cfg = cfg_for(teacher_dir, data, cache_dir, *extra)
    teacher = models.load(str(teacher_dir))
    train, held = load_data(cfg, teacher.tokenizer)
    build(cfg, train + held, teacher.model, teacher.tokenizer, progress=False)
    return cfg, teacher, train, held


def cfg_for(teacher_dir, data, cache_dir, *extra):
    """A config that caches the tiny teacher's top-k over `data` into cache_dir."""
    from stillroom.recipes import load_config

    over = [f"teacher.model={teacher_dir}", f"data.path={data}", "data.seq_len=64", f"cache.path={cache_dir}",
            "cache.batch_size=3", "loss.temperature=2.0", *extra]
    return load_config(None, over)


def logits(*shape, seed=0, scale=3.0):
    """Random logits of `shape` that require grad (scale: their spread)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).requires_grad_(True)


def ref_forward_kl(s, t, mask, T):
    """Plain autograd reference: sum over mask of T^2 * sum_v p (log p - log q)."""
    log_q = torch.log_softmax(s.double() / T, -1)
    log_p = torch.log_softmax(t.double() / T, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (T * T * kl * mask).sum()


def kd_inputs(seed=0, B=2, S=5, V=11):
    """Student logits, teacher logits and labels (the first two of row 0 ignored) for loss tests."""
    from stillroom.losses import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, S, V, generator=g) * 2
    t = torch.randn(B, S, V, generator=g) * 2
    y = torch.randint(0, V, (B, S), generator=g)
    y[0, :2] = IGNORE_INDEX
    return s, t, y
