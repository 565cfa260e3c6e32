"""The hostile-input catalog: every case is bad input to a real command, and each must end with one
clear line on stderr (`stillroom: error: ...`), exit code 2, no traceback, and nothing written.

Cases run in-process through `cli.main` (the same function the `stillroom` entry point calls: an
uncaught exception fails the test, which is how a traceback would show); a few also run as real
subprocesses to pin the entry point itself.
"""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stillroom import cli

from conftest import run_cli


def tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# Each case: (id, build(tmp, teacher, data) -> argv, expected words in the message).
# `tmp` is an empty folder the case may fill with its inputs; anything that appears in it beyond
# what the case made itself is "something written".

def _cfg(tmp, text):
    p = tmp / "c.yaml"
    p.write_text(text)
    return str(p)


def _base(teacher, data, out):
    return [f"teacher.model={teacher}", f"data.path={data}", f"train.output_dir={out}", "student.num_layers=2",
            "data.seq_len=64", "train.max_steps=2", "train.batch_size=2"]


def distill(tmp, teacher, data, *extra, config=None):
    return ["distill", *([config] if config else []), *_base(teacher, data, tmp / "out"), *extra]


def _file(tmp, name, content: bytes | str):
    p = tmp / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def _model_copy(tmp, teacher, name="m"):
    import shutil
    d = tmp / name
    shutil.copytree(teacher, d)
    return d


def _truncated_weights(tmp, teacher):
    d = _model_copy(tmp, teacher)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    return d


def _garbage_weights(tmp, teacher):
    d = _model_copy(tmp, teacher)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    return d


def _no_weights(tmp, teacher):
    d = _model_copy(tmp, teacher)
    (d / "model.safetensors").unlink()
    return d


def _bad_config_json(tmp, teacher):
    d = _model_copy(tmp, teacher)
    (d / "config.json").write_text("{not json")
    return d


def _no_tokenizer(tmp, teacher):
    d = _model_copy(tmp, teacher)
    for f in d.iterdir():
        if "token" in f.name or f.name.endswith(".model"):
            f.unlink()
    return d


def _other_vocab_model(tmp, teacher):
    """A model with its own, different tokenizer (another BPE vocabulary)."""
    from conftest import make_model, make_tokenizer, save
    tok = make_tokenizer(vocab_size=290)
    return save(make_model(tok, layers=2), tok, tmp / "other")


def _cache(tmp, teacher, data, *extra):
    out = tmp / "cache"
    assert cli.main(["cache", *_base(teacher, data, tmp / "unused"), f"cache.path={out}", "--no-progress",
                     *extra]) == 0
    return out


def _readonly_out(tmp):
    """A folder we may not write in: chmod 500 for a normal user; as root (CI), whom permission
    bits do not stop, a read-only file system (/sys)."""
    if os.geteuid() == 0:
        return Path("/sys/stillroom-ro")
    d = tmp / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return d


CASES = [
    # ---- config and overrides
    ("unknown key", lambda t, m, d: distill(t, m, d, "train.max_stepz=3"), "max_steps"),
    ("unknown section", lambda t, m, d: distill(t, m, d, "trian.lr=1"), "trian"),
    ("wrong type", lambda t, m, d: distill(t, m, d, "train.max_steps=many"), "max_steps"),
    ("negative steps", lambda t, m, d: distill(t, m, d, "train.max_steps=-5"), "max_steps"),
    ("zero batch size", lambda t, m, d: distill(t, m, d, "train.batch_size=0"), "batch_size"),
    ("absurd batch size", lambda t, m, d: distill(t, m, d, "train.batch_size=100000000"), "batch_size"),
    ("absurd seq_len", lambda t, m, d: distill(t, m, d, "data.seq_len=10000000"), "seq_len"),
    ("alpha above 1", lambda t, m, d: distill(t, m, d, "loss.alpha=1.5"), "alpha"),
    ("zero temperature", lambda t, m, d: distill(t, m, d, "loss.temperature=0"), "temperature"),
    ("nan learning rate", lambda t, m, d: distill(t, m, d, "train.lr=nan"), "lr"),
    ("infinite learning rate", lambda t, m, d: distill(t, m, d, "train.lr=inf"), "lr"),
    ("unknown loss kind", lambda t, m, d: distill(t, m, d, "loss.kind=medium"), "kind"),
    ("override without a value", lambda t, m, d: distill(t, m, d, "train.lr="), "lr"),
    ("missing config file", lambda t, m, d: ["distill", str(t / "nope.yaml")], "nope.yaml"),
    ("unknown recipe", lambda t, m, d: ["distill", "sofft"], "sofft"),
    ("config is not YAML", lambda t, m, d: ["distill", _cfg(t, "train: [1, 2\n  lr: ::")], "yaml"),
    ("config is a list", lambda t, m, d: ["distill", _cfg(t, "- 1\n- 2\n")], "mapping"),
    ("a section set to a number", lambda t, m, d: distill(t, m, d, "train=5"), "train"),
    ("config is binary", lambda t, m, d: ["distill", str(_file(t, "b.yaml", b"\xff\xfe\x00\x81garbage"))], "b.yaml"),
    ("--overwrite with --resume", lambda t, m, d: distill(t, m, d, "--overwrite", "--resume"), "exclude"),
    ("--resume with nothing to resume", lambda t, m, d: distill(t, m, d, "--resume"), "checkpoint"),
    ("output folder is a file", lambda t, m, d: ["distill", *_base(m, d, _file(t, "taken", "x"))], "taken"),
    ("read-only output folder", lambda t, m, d: ["distill", *_base(m, d, _readonly_out(t) / "run")], "cannot write"),
    # ---- data files
    ("missing data file", lambda t, m, d: distill(t, m, t / "none.jsonl"), "not found"),
    ("empty data file", lambda t, m, d: distill(t, m, _file(t, "e.txt", "")), "empty"),
    ("whitespace-only text", lambda t, m, d: distill(t, m, _file(t, "w.txt", "  \n\n\t ")), "no text"),
    ("non-UTF-8 text", lambda t, m, d: distill(t, m, _file(t, "l1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))),
     "UTF-8"),
    ("non-UTF-8 JSONL", lambda t, m, d: distill(t, m, _file(t, "l1.jsonl", b'{"text": "caf\xe9"}\n')), "UTF-8"),
    ("JSONL with broken lines", lambda t, m, d: distill(t, m, _file(
        t, "broken.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n[1, 2]\n')), "bad"),
    ("JSONL rows of unknown shape", lambda t, m, d: distill(t, m, _file(t, "shape.jsonl", '{"q": 1}\n' * 5)),
     "needs"),
    ("chat with no assistant turn", lambda t, m, d: distill(t, m, _file(
        t, "chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")), "assistant"),
    ("empty prompt and response", lambda t, m, d: distill(t, m, _file(
        t, "blank.jsonl", '{"prompt": "", "response": " "}\n' * 3)), "empty response"),
    ("data path is a folder", lambda t, m, d: distill(t, m, t, "data.format=jsonl"), "folder"),
    ("text too short for one example", lambda t, m, d: distill(t, m, _file(t, "short.txt", "a")), "usable"),
    # ---- model folders and files
    ("model path not found", lambda t, m, d: distill(t, t / "no-model", d), "not found"),
    ("GGUF that is not one", lambda t, m, d: distill(t, _file(t, "fake.gguf", b"GGUF" + b"\x00" * 40), d), "GGUF"),
    ("text file as a model", lambda t, m, d: distill(t, _file(t, "model.txt", "hello"), d), "not a model"),
    ("folder without config.json", lambda t, m, d: distill(t, t, d), "config.json"),
    ("config.json not JSON", lambda t, m, d: distill(t, _bad_config_json(t, m), d), "config.json"),
    ("truncated safetensors", lambda t, m, d: distill(t, _truncated_weights(t, m), d), "weights"),
    ("safetensors of zeros", lambda t, m, d: distill(t, _garbage_weights(t, m), d), "weights"),
    ("no weights file", lambda t, m, d: distill(t, _no_weights(t, m), d), "weights"),
    ("no tokenizer files", lambda t, m, d: distill(t, _no_tokenizer(t, m), d), "tokenizer"),
    ("student of another vocabulary", lambda t, m, d: distill(
        t, m, d, "student.init=pretrained", f"student.model={_other_vocab_model(t, m)}"), "vocab"),
    ("layer index beyond the teacher", lambda t, m, d: distill(t, m, d, "student.layers=[0,99]"), "layer"),
    # ---- caches
    ("cache folder missing", lambda t, m, d: distill(t, m, d, "teacher.kind=cache", f"teacher.cache={t / 'nc'}"),
     "cache"),
    ("cache index not JSON", lambda t, m, d: distill(t, m, d, "teacher.kind=cache",
                                                     f"teacher.cache={_file(t, 'index.json', '{').parent}"), "index"),
    ("cache for another seq_len", lambda t, m, d: distill(
        t, m, d, "teacher.kind=cache", f"teacher.cache={_cache(t, m, d, 'data.seq_len=48')}"), "seq_len"),
    ("cache for another tokenizer", lambda t, m, d: distill(
        t, m, d, "teacher.kind=cache", f"teacher.cache={_cache(t, m, d)}", "student.init=pretrained",
        f"student.model={_other_vocab_model(t, m)}"), "tokenizer"),
    ("cache with a shard gone", lambda t, m, d: distill(t, m, d, "teacher.kind=cache",
                                                        f"teacher.cache={_shard_gone(_cache(t, m, d))}"), "shard"),
    # ---- codistill
    ("codistill with one peer", lambda t, m, d: ["codistill", _cfg(t, "peers:\n  - {name: a, num_layers: 2}\n"),
                                                 *_base(m, d, t / "out")[:3]], "2 peers"),
    ("codistill peers with one name", lambda t, m, d: [
        "codistill", _cfg(t, "peers:\n  - {name: a, num_layers: 2}\n  - {name: a, num_layers: 1}\n"),
        *_base(m, d, t / "out")[:3]], "distinct"),
    ("codistill across processes in one", lambda t, m, d: [
        "codistill", "codistill", *_base(m, d, t / "out")[:3], "codistill.mode=predictions",
        "codistill.confidence=false", "peers.0.num_layers=2", "peers.1.layers=[0,3]"], "one peer per process"),
    ("confidence in predictions mode", lambda t, m, d: [
        "codistill", "codistill", *_base(m, d, t / "out")[:3], "codistill.mode=predictions",
        "peers.0.num_layers=2", "peers.1.layers=[0,3]"], "add codistill.confidence=false"),
    # ---- other commands and flags
    ("eval of a missing model", lambda t, m, d: ["eval", "--model", str(t / "x"), "--teacher", str(m),
                                                 "--data", str(d)], "not found"),
    ("generate with an empty prompt file", lambda t, m, d: ["generate", "--teacher", str(m), "--prompts",
                                                            str(_file(t, "p.txt", "\n\n")), "--out",
                                                            str(t / "o.jsonl")], "prompt"),
    ("generate with greedy and several answers", lambda t, m, d: [
        "generate", "--teacher", str(m), "--prompts", str(_file(t, "p.txt", "hi\n")), "--out", str(t / "o.jsonl"),
        "--num-answers", "2", "--temperature", "0"], "answers"),
    ("generate --top-logprobs without --api", lambda t, m, d: [
        "generate", "--teacher", str(m), "--prompts", str(_file(t, "p.txt", "hi\n")), "--out", str(t / "o.jsonl"),
        "--top-logprobs", "5"], "api"),
    ("cache from a cache", lambda t, m, d: ["cache", *_base(m, d, t / "o"), "teacher.kind=cache",
                                            f"teacher.cache={t}"], "live"),
    # methods
    ("unknown loss term", lambda t, m, d: distill(t, m, d, "loss.terms={ce: 0.5, hiden_cosine: 0.5}"),
     "hidden_cosine"),
    ("negative term weight", lambda t, m, d: distill(t, m, d, "loss.terms={ce: -1.0}"), "loss.terms"),
    ("all term weights zero", lambda t, m, d: distill(t, m, d, "loss.terms={ce: 0.0, forward_kl: 0}"), "0"),
    ("terms with an alpha schedule", lambda t, m, d: distill(t, m, d, "loss.terms={ce: 1.0}", "loss.alpha_end=0.5"),
     "alpha_end"),
    ("layer map beyond the student", lambda t, m, d: distill(t, m, d, "loss.terms={ce: 1.0, hidden_mse: 1.0}",
                                                             "loss.layer_map=[[7, 0]]"), "layer_map"),
    ("mix teacher missing", lambda t, m, d: distill(t, m, d, f"teacher.mix=[{{name: b, model: {t / 'gone'}}}]"),
     "not found"),
    ("mix teacher without a model", lambda t, m, d: distill(t, m, d, "teacher.mix=[{name: b}]"), "model"),
    ("two teachers with one name", lambda t, m, d: distill(t, m, d, f"teacher.mix=[{{name: teacher, model: {m}}}]"),
     "distinct"),
    ("route field on plain text", lambda t, m, d: distill(
        t, m, _file(t, "p.txt", "hello there " * 50), f"teacher.mix=[{{name: b, model: {m}}}]",
        "teacher.route_field=src"), "route_field"),
    ("route to an unknown teacher", lambda t, m, d: distill(
        t, m, _file(t, "r.jsonl", '{"prompt": "a", "response": "b c d", "src": "zed"}\n' * 4),
        f"teacher.mix=[{{name: b, model: {m}}}]", "teacher.route_field=src"), "names no teacher"),
    ("on-policy with a cache", lambda t, m, d: distill(t, m, d, "loss.on_policy=0.5", "teacher.kind=cache",
                                                       f"teacher.cache={t}"), "on_policy"),
    ("on-policy fraction above 1", lambda t, m, d: distill(t, m, d, "loss.on_policy=2"), "on_policy"),
    ("hidden terms with a cache", lambda t, m, d: distill(t, m, d, "loss.terms={ce: 1.0, hidden_mse: 1.0}",
                                                          "teacher.kind=cache", f"teacher.cache={t}"), "hidden"),
    ("cross-tokenizer with a mix", lambda t, m, d: distill(t, m, d, "loss.cross_tokenizer=uld",
                                                           f"teacher.mix=[{{name: b, model: {m}}}]"), "uld"),
    ("codistill with a distill-only loss", lambda t, m, d: ["codistill", "codistill", f"teacher.model={m}",
                                                            "loss.on_policy=0.5"], "stillroom distill"),
    ("finetune data missing", lambda t, m, d: distill(t, m, d, f"finetune.data={t / 'gone.jsonl'}"), "finetune.data"),
    # ---- issue 18: what still crashed or misled
    ("lone surrogate in a JSON string", lambda t, m, d: distill(t, m, _file(
        t, "sur.jsonl", d.read_text() + '{"prompt": "a \\ud800 b", "response": "c"}\n')), "invalid Unicode"),
    ("eval --seq-len 0", lambda t, m, d: ["eval", "--model", str(m), "--teacher", str(m), "--data", str(d),
                                          "--seq-len", "0"], "--seq-len"),
    ("eval --batch-size 0", lambda t, m, d: ["eval", "--model", str(m), "--data", str(d), "--batch-size", "0"],
     "--batch-size"),
    ("eval --max-batches 0", lambda t, m, d: ["eval", "--model", str(m), "--data", str(d), "--max-batches", "0"],
     "--max-batches"),
    ("eval --seq-len beyond the context", lambda t, m, d: ["eval", "--model", str(m), "--teacher", str(m),
                                                           "--data", str(d), "--seq-len", "4096"], "context"),
    ("eval --out is a folder", lambda t, m, d: ["eval", "--model", str(m), "--teacher", str(m), "--data", str(d),
                                                "--out", str(t)], "folder"),
    ("generate --out is a folder", lambda t, m, d: ["generate", "--teacher", str(m), "--out", str(t)], "folder"),
    ("generate --max-new-tokens 0", lambda t, m, d: ["generate", "--teacher", str(m), "--out", str(t / "o.jsonl"),
                                                     "--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate names its flags", lambda t, m, d: [
        "generate", "--teacher", str(m), "--out", str(t / "o.jsonl"), "--num-answers", "3"], "--temperature"),
    ("generate rows with no prompt", lambda t, m, d: [
        "generate", "--teacher", str(m), "--prompts", str(_file(t, "p.jsonl", '{"body": "x"}\n')),
        "--out", str(t / "o.jsonl")], "--prompt-field"),
    ("compare --rounds 0", lambda t, m, d: ["compare", str(m), str(m), "--data", str(d), "--rounds", "0"], "--rounds"),
    ("compare --out is a folder", lambda t, m, d: ["compare", str(m), str(m), "--data", str(d), "--out", str(t)],
     "folder"),
    ("duplicate key in a config", lambda t, m, d: [
        "distill", _cfg(t, "train:\n  max_steps: 2\n  lr: 0.001\n  max_steps: 400000\n"), *_base(m, d, t / "out")[:3]],
     "twice"),
    ("a FIFO as data", lambda t, m, d: distill(t, m, _fifo(t)), "not a regular file"),
    ("/dev/zero as data", lambda t, m, d: distill(t, m, Path("/dev/zero"), "data.format=text"), "not a regular file"),
    ("config vocab differs from the weights", lambda t, m, d: distill(t, _vocab_lie(t, m), d), "vocab_size"),
    ("empty teacher.model", lambda t, m, d: distill(t, m, d, "teacher.model=''"), "teacher.model"),
    ("export of a codistill run", lambda t, m, d: ["export", str(_codistill_run(t, m))], "final/a"),
    ("eval of a codistill run", lambda t, m, d: ["eval", "--model", str(_codistill_run(t, m)), "--teacher", str(m),
                                                 "--data", str(d)], "peers: a, b"),
    ("rows all in an unknown format", lambda t, m, d: distill(t, m, _file(t, "u.jsonl", '{"query": "a", "reply": "b"}\n' * 4)),
     "data.fields"),
    ("MT-Bench turns as training data", lambda t, m, d: distill(t, m, _file(
        t, "mt.jsonl", '{"turns": ["Hi.", "More?"]}\n' * 4)), "stillroom generate"),
]


def _fifo(tmp):
    p = tmp / "pipe.jsonl"
    os.mkfifo(p)
    return p


def _vocab_lie(tmp, teacher):
    d = _model_copy(tmp, teacher)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] += 10
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _codistill_run(tmp, teacher):
    import shutil
    run = tmp / "co"
    for peer in ("a", "b"):
        shutil.copytree(teacher, run / "final" / peer)
    return run


def _shard_gone(cache: Path) -> Path:
    for f in cache.glob("shard-*.safetensors"):
        f.unlink()
    return cache


# Files a command must never write over: its own inputs (symlinks included) and files it did not make
# (the catalog checks every file's bytes, too).

def _alpaca(tmp):
    p = tmp / "alpaca.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}"}) + "\n"
                         for i in range(3)))
    return p


def _other(tmp, text, name="other.json"):
    p = tmp / name
    p.write_text(text)
    return p


def _link(tmp, target):
    p = tmp / "link.jsonl"
    p.symlink_to(target)
    return p


OWN_FILES = [
    ("generate --out is its --prompts", lambda t, T, d: ["generate", "--teacher", T, "--prompts", _alpaca(t), "--out",
                                                         t / "alpaca.jsonl"], "--prompts file"),
    ("generate --out links to its --prompts", lambda t, T, d: ["generate", "--teacher", T, "--prompts", _alpaca(t),
                                                               "--out", _link(t, t / "alpaca.jsonl")], "--prompts file"),
    ("generate --out another JSONL", lambda t, T, d: ["generate", "--teacher", T, "--out",
                                                      _other(t, '{"a": 1}\n{"a": 2}\n', "rows.jsonl")],
     "not an answers file"),
    ("generate --out a JSON array", lambda t, T, d: ["generate", "--teacher", T, "--out",
                                                     _other(t, '[{"prompt": "x"}]', "rows.json")], "not an answers file"),
    ("eval --out is its --data", lambda t, T, d: ["eval", "--model", T, "--data", _alpaca(t), "--out",
                                                  t / "alpaca.jsonl"], "--data file"),
    ("eval --out a file it did not write", lambda t, T, d: ["eval", "--model", T, "--data", d, "--out",
                                                            _other(t, '{"x": 1}')], "not a result"),
    ("compare --out is its --data", lambda t, T, d: ["compare", T, T, "--data", _alpaca(t), "--out",
                                                     t / "alpaca.jsonl"], "--data file"),
    ("compare --out a file it did not write", lambda t, T, d: ["compare", T, T, "--data", d, "--out",
                                                               _other(t, "notes, not JSON\n")], "not a result"),
]
CASES += OWN_FILES


# Issue 30's second pass: damaged side files, odd paths and values, a folder of the other command.

def _run_folder(tmp, kind="run", compare=None, metrics=None):
    """A run folder as stillroom leaves it (marker, config, log, a checkpoint), with side files."""
    run = tmp / "r"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / ".stillroom.json").write_text(json.dumps({"kind": kind}))
    (run / "config.yaml").write_text("train:\n  max_steps: 2\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    (run / "checkpoints" / "step_0000002" / "trainer_state.json").write_text('{"step": 2}')
    if compare is not None:
        (run / "compare.json").write_text(compare)
    if metrics is not None:
        (run / "final").mkdir()
        (run / "final" / "metrics.json").write_text(metrics)
    return run


def _deep(tmp, name="deep.jsonl"):
    return _file(tmp, name, '{"prompt": "a", "response": ' + "[" * 100_000 + "]" * 100_000 + "}\n")


def _answers_with_damaged_progress(tmp):
    out = _file(tmp, "a.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]}) + "\n")
    _file(tmp, "a.jsonl.progress.json", '{"done": 1, "pre')
    return out


SECOND_PASS = [
    ("report with a truncated compare.json", lambda t, m, d: ["report", _run_folder(t, compare='{"columns": {"a"')],
     "compare.json"),
    ("report with a compare.json of zeros", lambda t, m, d: ["report", _run_folder(t, compare="\0" * 64)],
     "compare.json"),
    ("report with a compare.json of another shape", lambda t, m, d: ["report", _run_folder(t, compare="[1, 2]")],
     "compare.json"),
    ("report with a garbled final/metrics.json", lambda t, m, d: ["report", _run_folder(t, metrics='{"eval": 5}')],
     "metrics.json"),
    ("a dangling symlink as output_dir", lambda t, m, d: ["distill", *_base(m, d, _link(t, t / "gone" / "x"))],
     "symlink"),
    ("seed beyond 32 bits", lambda t, m, d: distill(t, m, d, "train.seed=99999999999999999999999"), "train.seed"),
    ("negative seed", lambda t, m, d: distill(t, m, d, "train.seed=-1"), "train.seed"),
    ("true as a step count", lambda t, m, d: distill(t, m, d, "train.max_steps=true"), "train.max_steps"),
    ("false as a batch size", lambda t, m, d: distill(t, m, d, "eval.batch_size=false"), "eval.batch_size"),
    ("JSON nested 100,000 deep in distill", lambda t, m, d: distill(t, m, _deep(t)), "nested too deep"),
    ("JSON nested 100,000 deep in prepare", lambda t, m, d: ["prepare", *_base(m, _deep(t), t / "out")],
     "nested too deep"),
    ("JSON nested 100,000 deep in generate", lambda t, m, d: ["generate", "--teacher", m, "--prompts", _deep(t),
                                                               "--out", t / "o.jsonl"], "nested too deep"),
    ("an image content part", lambda t, m, d: distill(t, m, _file(t, "img.jsonl", json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "a cat"}]}) + "\n")), "image_url"),
    ("distill --resume of a codistill run", lambda t, m, d: ["distill", *_base(m, d, _run_folder(t, "codistill run")),
                                                             "--resume"], "stillroom codistill"),
    ("codistill --overwrite of a distill run", lambda t, m, d: [
        "codistill", "codistill", *_base(m, d, _run_folder(t, "run"))[:3], "--overwrite"], "not a codistill run"),
    ("generate with a damaged progress record", lambda t, m, d: [
        "generate", "--teacher", m, "--prompts", _file(t, "p.txt", "hi\n"), "--out", _answers_with_damaged_progress(t)],
     "damaged"),
    # found trying it as a new user (issue 30's last item)
    ("gzip-compressed data", lambda t, m, d: distill(t, m, _file(t, "d.jsonl.gz", __import__("gzip").compress(
        d.read_bytes()))), "gunzip"),
    ("generate --out /dev/null", lambda t, m, d: ["generate", "--teacher", m, "--out", "/dev/null"],
     "not a regular file"),
    ("eval.gen_tokens beyond the context", lambda t, m, d: distill(t, m, d, "eval.gen_tokens=100000000"),
     "eval.gen_tokens"),
    ("eval --gen-tokens beyond the context", lambda t, m, d: ["eval", "--model", m, "--data", d, "--gen-tokens",
                                                              "100000000"], "--gen-tokens"),
    ("prompts that fill seq_len", lambda t, m, d: distill(t, m, d, "data.seq_len=8"), "raise data.seq_len"),
    ("report of a folder that is not a run", lambda t, m, d: ["report", t], "no metrics.jsonl"),
]
CASES += SECOND_PASS


def contents(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(case, tmp_path, teacher_dir, chat_file, capsys):
    name, build, words = case
    work = tmp_path / "work"
    work.mkdir()
    argv = [str(a) for a in build(work, teacher_dir, chat_file)]
    capsys.readouterr()
    before, held = tree(work), contents(work)
    try:
        code = cli.main(argv + (["--no-progress"] if argv[0] in ("distill", "codistill", "cache", "generate",
                                                                  "eval", "compare") else []))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("stillroom: error:")]
    assert code == 2, f"{name}: exit {code}\n{err[-2000:]}"
    assert len(lines) == 1, f"{name}: expected one error line\n{err[-2000:]}"
    assert words.lower() in lines[0].lower(), f"{name}: {lines[0]!r} does not mention {words!r}"
    assert "Traceback" not in err
    assert tree(work) == before, f"{name}: wrote {sorted(tree(work) - before)}"
    assert contents(work) == held, f"{name}: changed {sorted(k for k, v in contents(work).items() if held.get(k) != v)}"


def test_catalog_size():
    assert len(CASES) >= 40 + len(SECOND_PASS)


def test_paths_with_spaces_work(tmp_path, teacher_dir, chat_file):
    """Not hostile at all: spaces in every path (model, data, output) are fine."""
    import shutil
    sp = tmp_path / "a folder with spaces"
    sp.mkdir()
    shutil.copytree(teacher_dir, sp / "my teacher")
    shutil.copy(chat_file, sp / "my data.jsonl")
    r = run_cli("distill", *_base(sp / "my teacher", sp / "my data.jsonl", sp / "my run"), "--no-progress",
                "eval.gen_tokens=2", "eval.gen_prompts=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (sp / "my run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,words", [
    (["distill", "train.max_stepz=3"], "max_steps"),
    (["distill", "--no-such-flag"], "unrecognized"),
    (["frobnicate"], "invalid choice"),
])
def test_the_entry_point_prints_one_line(argv, words):
    """As a real process: one line, exit 2, no traceback (argparse's usage errors included)."""
    r = subprocess.run([sys.executable, "-m", "stillroom", *argv], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
