"""Every file a command reads, damaged three ways (cut in half, zeroed at the same size, a few bytes
flipped), for distill (fresh, --resume, from a cache), cache, generate, eval, compare, export and
report (issue 30). Whatever the damage, the command either works (a flipped byte in text or in a
weight can be data like any other) or stops with one line and exit 2, never a traceback; and it
changes nothing of the user's: on a refusal not one file, on success only what it writes.

Commands run in-process through cli.main (as test_hostile.py's catalog), on one small world built
once: the tiny teacher, a finished run with two checkpoints, its data store, a top-k cache, a
compare.json and a generate answers file with its progress record."""
import json
import shutil
from pathlib import Path

import pytest

from stillroom import cli

from conftest import tiny_overrides

MODES = {
    "truncated": lambda b: b[:len(b) // 2],
    "zeroed": lambda b: bytes(len(b)),
    "garbled": lambda b: bytes(x ^ 0x5A if i in {len(b) // 3, len(b) // 2, 2 * len(b) // 3} else x
                               for i, x in enumerate(b)),
}


def main(argv) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_dir, chat_file):
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(teacher_dir, w / "teacher")
    shutil.copy(chat_file, w / "data.jsonl")
    (w / "prompts.txt").write_text("Name a colour.\nName a fruit.\nName a tree.\n")
    over = [*tiny_overrides(w / "teacher", w / "data.jsonl", w / "run"), f"data.store={w / 'store'}",
            "train.max_steps=4", "train.save_every=2", "eval.gen_prompts=1", "--no-progress"]
    for argv in (["distill", *over],
                 ["cache", *over, f"cache.path={w / 'cache'}"],
                 ["compare", w / "teacher", w / "run", "--data", w / "data.jsonl", "--rounds", "1", "--max-examples",
                  "2", "--new-tokens", "2", "--prefill-tokens", "8", "--out", w / "run" / "compare.json",
                  "--no-progress"],
                 ["generate", "--teacher", w / "teacher", "--prompts", w / "prompts.txt", "--out", w / "answers.jsonl",
                  "--max-new-tokens", "4", "--batch-size", "1", "--no-progress"]):
        code, err = main(argv)
        assert code == 0, err[-3000:]
    (w / "answers.jsonl").write_bytes(b"".join((w / "answers.jsonl").read_bytes().splitlines(keepends=True)[:2]))
    progress = json.loads((w / "answers.jsonl.progress.json").read_text())
    progress.update(done=2, bytes=(w / "answers.jsonl").stat().st_size)   # two of three answered: continued
    from stillroom.teachers.generate import _sha
    progress["prefix"] = _sha([[{"role": "user", "content": p}] for p in ("Name a colour.", "Name a fruit.")])
    (w / "answers.jsonl.progress.json").write_text(json.dumps(progress))
    return w


def _base(teacher, data, out, store):
    return [*tiny_overrides(teacher, data, out), f"data.store={store}", "train.max_steps=1", "eval.gen_prompts=1",
            "--no-progress"]


# command: (argv(w: the damaged copy, d: its data file, o: the world it was copied from), what it may
# write when it works, beside the data store, which any command may add to)
COMMANDS = {
    "distill": (lambda w, d, o: ["distill", *_base(w / "teacher", d, w / "new", w / "store")], ["new"]),
    # the run's own teacher and data paths: a resume refuses other ones
    "resume": (lambda w, d, o: ["distill", *_base(o / "teacher", o / "data.jsonl", w / "run", w / "store"),
                                "train.max_steps=5", "train.save_every=2", "--resume"], ["run"]),
    "from-cache": (lambda w, d, o: ["distill", *_base(w / "teacher", d, w / "new", w / "store"), "teacher.kind=cache",
                                    f"teacher.cache={w / 'cache'}"], ["new"]),
    "cache": (lambda w, d, o: ["cache", *_base(w / "teacher", d, w / "x", w / "store"),
                               f"cache.path={w / 'newcache'}"], ["newcache"]),
    "cache-continue": (lambda w, d, o: ["cache", *_base(w / "teacher", d, w / "x", w / "store"),
                                        f"cache.path={w / 'cache'}"], ["cache"]),
    "generate": (lambda w, d, o: ["generate", "--teacher", w / "teacher", "--prompts", w / "prompts.txt", "--out",
                                  w / "answers.jsonl", "--max-new-tokens", "4", "--batch-size", "1", "--no-progress"],
                 ["answers.jsonl", "answers.jsonl.progress.json"]),
    "eval": (lambda w, d, o: ["eval", "--model", w / "run", "--teacher", w / "teacher", "--data", d, "--max-batches",
                              "1", "--gen-prompts", "1", "--gen-tokens", "2", "--no-progress"], []),
    "compare": (lambda w, d, o: ["compare", w / "teacher", w / "run", "--data", d, "--rounds", "1", "--max-examples",
                                 "2", "--new-tokens", "2", "--prefill-tokens", "8", "--no-progress"], []),
    "export": (lambda w, d, o: ["export", w / "run", "--type", "f16", "--out", w / "x.gguf", "--no-check"],
               ["x.gguf"]),
    "report": (lambda w, d, o: ["report", w / "run"], ["run/report.html"]),
}

# what is damaged -> the commands that read it
TARGETS = {
    "data.jsonl": ["distill", "eval", "cache"],
    "teacher/config.json": ["distill", "generate"],
    "teacher/model.safetensors": ["distill", "eval"],
    "teacher/tokenizer.json": ["generate"],
    "store/*/tokens.npy": ["distill"],
    "store/*/index.json": ["distill"],
    "run/checkpoints/step_0000004/model.safetensors": ["resume"],
    "run/checkpoints/step_0000004/optimizer.bin": ["resume"],
    "run/checkpoints/step_0000004/trainer_state.json": ["resume"],
    "run/metrics.jsonl": ["report", "resume"],
    "run/compare.json": ["report"],
    "run/final/metrics.json": ["report"],
    "run/final/model.safetensors": ["export", "compare"],
    "run/final/config.json": ["eval"],
    "cache/shard-00000.safetensors": ["from-cache"],
    "cache/index.json": ["from-cache", "cache-continue"],
    "answers.jsonl": ["generate"],
    "answers.jsonl.progress.json": ["generate"],
}
CASES = [(t, c, m) for t, cs in TARGETS.items() for c in cs for m in MODES]


def contents(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.endswith((".lock", ".holder.json"))}


@pytest.mark.parametrize("target,command,mode", CASES, ids=[f"{c}-{t}-{m}" for t, c, m in CASES])
def test_a_damaged_input_is_used_or_refused_in_one_line(target, command, mode, world, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(world, w, symlinks=True)
    (victim,) = w.glob(target)
    # a store is keyed on its data file's path: a damaged store is read for the world's own data file
    data = world / "data.jsonl" if target.startswith("store/") else w / "data.jsonl"
    victim.write_bytes(MODES[mode](victim.read_bytes()))
    before = contents(w)
    build, writes = COMMANDS[command]
    code, err = main(build(w, data, world))
    lines = [x for x in err.splitlines() if x.startswith("stillroom: error:")]
    assert "Traceback" not in err, err[-3000:]
    assert code in (0, 2), f"exit {code}: {err[-3000:]}"
    after = contents(w)
    old_stores = {k.split("/")[1] for k in before if k.startswith("store/")}
    mine = [*writes] if code == 0 else []   # a refusal writes nothing
    allowed = lambda k: (k.startswith("store/") and k.split("/")[1] not in old_stores  # a new data store: the  # noqa: E731
                         or any(k == x or k.startswith(x + "/") for x in mine))       # cache's, not the user's
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and not allowed(k))
    assert not changed, f"exit {code}, changed {changed}: {err[-2000:]}"
    if code == 2:
        assert len(lines) == 1, err[-3000:]
