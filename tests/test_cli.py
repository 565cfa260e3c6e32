"""The CLI as a user calls it: recipes, overrides, eval, generate, and one-line errors (exit 2)."""
import json
import re
from pathlib import Path

import pytest

from stillroom.config import CodistillRunConfig, Config
from stillroom.recipes import RECIPES, load_config

from conftest import assert_user_error, make_model, make_tokenizer, run_cli, save, tiny_overrides


def test_version_and_print_config():
    r = run_cli("--version")
    assert r.returncode == 0 and "stillroom" in r.stdout
    r = run_cli("distill", "soft", "loss.temperature=3", "--print-config")
    assert r.returncode == 0
    assert "temperature: 3" in r.stdout and "kind: soft" in r.stdout and "output_dir: runs/soft" in r.stdout
    # overrides may also follow the flags
    r = run_cli("codistill", "codistill", "--print-config", "peers.1.num_layers=3", "codistill.mode=weights")
    assert r.returncode == 0 and "mode: weights" in r.stdout and "num_layers: 3" in r.stdout


RECIPE_NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_command(recipe):
    """A recipe's first line is the command that runs it: -> (subcommand, launched with 2 processes?)."""
    first = (RECIPES / f"{recipe}.yaml").read_text().splitlines()[0]
    m = re.match(r"# (accelerate launch --multi_gpu --num_processes 2 -m )?stillroom (distill|codistill) (\S+)", first)
    assert m and m[3] == recipe, first
    return m[2], bool(m[1])


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_every_recipe_loads_and_opens_with_its_command(recipe):
    command, _ = recipe_command(recipe)
    cfg = load_config(recipe, cls=CodistillRunConfig if command == "codistill" else Config)
    assert cfg.train.output_dir == f"runs/{recipe}"


GOLDEN = Path(__file__).parent / "golden" / "recipes.json"


def _fingerprint(out: Path) -> dict:
    """What must not change when code moves: per final model folder, a hash of its weights (names
    and bytes) and float64 sums per tensor; the files of final/; the keys of the training log's
    records; the keys of a checkpoint's trainer_state.json."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    models = {}
    for f in sorted(out.glob("**/final/**/model.safetensors")):   # final/, final/<peer>/, finetune/final/
        w = load_file(str(f))
        h = hashlib.sha256()
        for k in sorted(w):
            h.update(k.encode())
            h.update(w[k].contiguous().view(torch.uint8).numpy().tobytes())
        models[str(f.parent.relative_to(out))] = {"sha256": h.hexdigest(),
                                                  "sums": {k: float(w[k].double().sum()) for k in sorted(w)}}
    log_keys = set()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        log_keys |= {f"eval.{k}" for k in rec["eval"]} if "eval" in rec else set(rec)
    state = sorted(out.glob("checkpoints/step_*/trainer_state.json"))
    return {"models": models,
            "final_files": sorted(str(p.relative_to(out / "final")) for p in (out / "final").rglob("*") if p.is_file()),
            "log_keys": sorted(log_keys),
            "trainer_state_keys": sorted(json.loads(state[-1].read_text())) if state else None}


def _machine() -> str:
    """The machine kind weights are reproducible on, bit for bit: torch, its CPU kernels, the
    teacher's dtype and the student's precision (teacher.dtype=auto and train.mixed_precision=auto
    run bf16 on a CPU with native bf16, fp32 elsewhere)."""
    import torch

    from stillroom.models.running import teacher_dtype
    from stillroom.run.tracking import student_precision

    dtype = str(teacher_dtype("auto", "cpu")).removeprefix("torch.")
    return (f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, teacher {dtype}, "
            f"student {student_precision('auto', 'cpu')}")


# On a machine kind with no record the weights can only be compared loosely: between the two kinds
# recorded (fp32 teacher on AVX2, bf16 teacher on AVX512) the per-tensor sums of these few-step
# runs differ by up to 0.04 (0.2% of the embeddings' sum, 5% of a small projection's).
LOOSE = 5e-2


def check_golden(recipe: str, got: dict):
    """Compare with tests/golden/recipes.json (STILLROOM_GOLDEN=write records this machine kind).
    Files and log keys are the same everywhere. Weights are recorded per machine kind (`_machine`)
    and compared bit for bit there (same torch, same CPU kernels, same teacher dtype); on a kind
    with no record, the per-tensor sums must agree with every recorded kind's to LOOSE."""
    import os
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"recipes": {}, "weights": {}}
    if os.environ.get("STILLROOM_GOLDEN") == "write":
        golden["recipes"][recipe] = {k: v for k, v in got.items() if k != "models"}
        golden["weights"].setdefault(_machine(), {})[recipe] = got["models"]
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    want = golden["recipes"][recipe]
    assert got["final_files"] == want["final_files"]
    assert got["log_keys"] == want["log_keys"]
    assert got["trainer_state_keys"] == want["trainer_state_keys"]
    here = golden["weights"].get(_machine(), {}).get(recipe)
    if here is not None:
        assert sorted(got["models"]) == sorted(here)
        for name, m in here.items():
            assert got["models"][name]["sha256"] == m["sha256"], f"{recipe} {name}: final weights changed"
        return
    for kind, recipes in golden["weights"].items():
        for name, m in recipes.get(recipe, {}).items():   # a kind recorded before a recipe changed has none
            for k, v in m["sums"].items():
                assert got["models"][name]["sums"][k] == pytest.approx(v, rel=LOOSE, abs=LOOSE), (recipe, kind, name, k)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_every_recipe_runs_a_few_steps(tmp_path, teacher_dir, chat_file, recipe):
    """Each recipe runs on the tiny models and ends with its golden weights, files and log keys."""
    from conftest import launch

    out = tmp_path / recipe
    command, distributed = recipe_command(recipe)
    over = tiny_overrides(teacher_dir, chat_file, out) + ["train.save_every=2"]
    if command == "codistill":  # the tiny teacher has 4 layers
        over = [o for o in over if not o.startswith("student.")] + ["peers.0.num_layers=2", "peers.1.layers=[0,3]"]
    over += {"multi_teacher": [f"teacher.mix.0.model={teacher_dir}"],       # instead of runs/demo/final
             "cross_tokenizer": [f"student.model={teacher_dir}"],           # instead of SmolLM2
             "two_stage": ["finetune.max_steps=1"],
             "pruned": ["student.prune_heads=2", "student.prune_intermediate=24"]}.get(recipe, [])
    if distributed:
        r = launch(2, "-m", "stillroom", command, recipe, *over, "--no-progress")
    else:
        r = run_cli(command, recipe, *over, "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]
    assert "after" in r.stdout
    if command == "codistill":
        assert (out / "final" / "a" / "config.json").is_file() and (out / "final" / "b" / "config.json").is_file()
    else:
        assert (out / "final" / "config.json").is_file()
    check_golden(recipe, _fingerprint(out))


@pytest.mark.parametrize("override, pattern", [
    ("train.lrr=1", r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"),
    ("trian.lr=1", r"unknown config key 'trian' \(did you mean 'train'\?\)"),
    ("loss.alpha=1.5", r"loss.alpha.*less than or equal to 1"),
    ("loss.alpha=-0.1", r"loss.alpha.*greater than or equal to 0"),
    ("loss.temperature=0", r"loss.temperature.*greater than 0"),
    ("loss.kind=medium", r"loss.kind"),
    ("train.max_steps=abc", r"train.max_steps.*integer"),
    ("student.init=pretrained", r"needs student.model"),
    ("train.lr", r"key=value"),
])
def test_bad_config_values(override, pattern):
    assert_user_error(run_cli("distill", "soft", override), pattern)


def test_mixed_precision_no_is_not_read_as_false():
    from stillroom.recipes import load_config

    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def test_missing_config_file_names_the_recipes():
    assert_user_error(run_cli("distill", "nope.yaml"), r"config file not found: nope.yaml \(bundled recipes: .*soft")


def test_invalid_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    assert_user_error(run_cli("distill", tmp_path / "bad.yaml"), "not valid YAML")


def test_bad_data_leaves_nothing_written(tmp_path, teacher_dir):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{broken\n')
    cases = [(tmp_path / "missing.txt", "data file not found"), (empty, "is empty"),
             (bad, r"1 of 2 rows .* are bad: row 2 \(invalid JSON")]
    for data, pattern in cases:
        assert_user_error(run_cli("distill", *tiny_overrides(teacher_dir, data, out)), pattern)
        assert not out.exists()


def test_a_teacher_attention_this_install_cannot_run_is_one_line(tmp_path, teacher_dir, text_file):
    """flash_attention_2 without its package: one line, exit 2, no folder -- from distill (the
    primary teacher and a mix entry) and cache, each of which sets the teacher's attention."""
    out = tmp_path / "o"
    want = r"attention=flash_attention_2 cannot run here \(.*not.* installed\): set it to auto, sdpa or eager"
    tiny = tiny_overrides(teacher_dir, text_file, out)
    cases = [("distill", *tiny, "teacher.attention=flash_attention_2"),
             ("distill", *tiny, "teacher.mix=[{name: two, model: " + str(teacher_dir) + ", attention: flash_attention_2}]"),
             ("cache", f"teacher.model={teacher_dir}", f"data.path={text_file}", "data.seq_len=64",
              f"cache.path={out}", "teacher.attention=flash_attention_2")]   # codistill: run/test_codistill.py
    for args in cases:
        assert_user_error(run_cli(*args), want)
        assert not out.exists(), args
    r = run_cli("distill", *tiny, "teacher.attention=fast")
    assert_user_error(r, r"teacher.attention.*'auto', 'eager', 'sdpa'")


def test_seq_len_beyond_context(tmp_path, teacher_dir, chat_file):
    r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "o", **{"data.seq_len": 4096}))
    assert_user_error(r, "beyond the teacher's context of 512")


def test_mismatched_vocabularies(tmp_path, teacher_dir, chat_file):
    other = make_tokenizer()
    other.add_tokens([f"<x{i}>" for i in range(7)])
    student = save(make_model(other, layers=1), other, tmp_path / "student")
    r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "o"),
                "student.init=pretrained", f"student.model={student}")
    assert_user_error(r, r"tokenizers differ \(teacher vocab \d+, student vocab \d+\)")
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_id(tmp_path, chat_file):
    r = run_cli("distill", *tiny_overrides("nobody/no-such-model", chat_file, tmp_path / "o"),
                env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(r, "could not load 'nobody/no-such-model' from the Hugging Face Hub")


def test_existing_output_needs_overwrite_or_resume(tmp_path, teacher_dir, chat_file):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = tiny_overrides(teacher_dir, chat_file, out)
    assert_user_error(run_cli("distill", *args), "already exists; pass --overwrite")
    assert_user_error(run_cli("distill", *args, "--resume"), "no complete checkpoint")
    assert_user_error(run_cli("distill", *args, "--resume", "--overwrite"), "exclude each other")
    assert (out / "keep.txt").exists()
    # a folder stillroom did not make is never deleted, even with --overwrite (issue 18)
    assert_user_error(run_cli("distill", *args, "--overwrite"), "was not made by stillroom")
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    r = run_cli("distill", *args, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    (out / "final" / "stale.txt").write_text("from the previous run")
    r = run_cli("distill", *args, "--overwrite", "--no-progress")      # a run of its own: replaced
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "final" / "stale.txt").exists() and (out / "final").is_dir()


def test_eval_command_json_and_table(tmp_path, teacher_dir, chat_file):
    out = tmp_path / "run"
    assert run_cli("distill", *tiny_overrides(teacher_dir, chat_file, out), "--no-progress").returncode == 0
    r = run_cli("eval", "--model", out / "final", "--teacher", teacher_dir, "--data", chat_file, "--json",
                "--out", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res == json.loads((tmp_path / "e.json").read_text())
    s, t = res["eval"]["student"], res["eval"]["teacher"]
    assert s["params"] < t["params"] and s["perplexity"] > 1 and 0 <= s["agreement"] <= 1
    assert s["gen_tokens_per_s"] > 0 and s["size_mb"] > 0 and res["held_out_tokens"] > 0
    assert s["bits_per_byte"] > 0 and t["bits_per_byte"] > 0
    r = run_cli("eval", "--model", out / "final", "--teacher", teacher_dir, "--data", chat_file)
    assert r.returncode == 0 and "top-1 agreement" in r.stdout and "bits per byte" in r.stdout
    assert_user_error(run_cli("eval", "--model", out / "final", "--teacher", teacher_dir,
                              "--data", tmp_path / "none.jsonl"), "data file not found")


def test_generate_is_resumable(tmp_path, teacher_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi.\nName a cat.\nCount to three.\n")
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--teacher", teacher_dir, "--prompts", prompts, "--out", out,
            "--max-new-tokens", "4", "--no-progress"]
    r = run_cli(*args, "--num-prompts", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    first = out.read_text().splitlines()
    assert len(first) == 2
    with open(out, "a") as f:
        f.write('{"messages": [{"role": "us')  # a crash mid-line
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert out.read_text().splitlines()[:2] == first  # kept, not regenerated
    assert [row["messages"][0]["content"] for row in rows] == ["Say hi.", "Name a cat.", "Count to three."]
    assert all(row["messages"][1]["role"] == "assistant" for row in rows)
    other = tmp_path / "other.txt"
    other.write_text("Something else.\n")
    assert_user_error(run_cli("generate", "--teacher", teacher_dir, "--prompts", other, "--out", out),
                      "answers to other prompts")
    assert_user_error(run_cli("generate", "--teacher", teacher_dir, "--prompts", tmp_path / "x.txt",
                              "--out", out), "prompts file not found")


def test_generated_conversations_train_as_sequence_level_kd(tmp_path, teacher_dir):
    """`generate` output is training data: alpha=0 is plain CE on the teacher's text."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"Tell me about number {i}." for i in range(12)))
    data = tmp_path / "seq.jsonl"
    assert run_cli("generate", "--teacher", teacher_dir, "--prompts", prompts, "--out", data,
                   "--max-new-tokens", "6", "--no-progress").returncode == 0
    r = run_cli("distill", "hard", *tiny_overrides(teacher_dir, data, tmp_path / "o"), "loss.alpha=0",
                "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("verb, section, fields", [
    ("eval", "DataConfig", ("seq_len", "skip_bad_rows")),
    ("eval", "EvalConfig", ("batch_size", "max_batches", "max_new_tokens", "gen_tokens", "gen_prompts")),
    ("compare", "DataConfig", ("seq_len",)),
    ("served-check", "DataConfig", ("seq_len",)),
    ("served-check", "ServedConfig", ("url", "api", "top_k", "concurrency")),
    ("generate", "GenerateConfig", ("max_new_tokens", "batch_size")),
])
def test_a_flag_style_verbs_flags_say_what_the_config_says(verb, section, fields):
    """A flag that sets a config key takes its help from that key's docstring (one text, in
    config.py) and its limits from the section: the parser's help is the field's description."""
    import stillroom.config as config
    from stillroom.cli import parser

    sub = next(a for a in parser()._actions if a.dest == "command").choices[verb]
    by_dest = {a.dest: a for a in sub._actions}
    cls = getattr(config, section)
    for name in fields:
        text = " ".join((cls.model_fields[name].description or "").split())
        assert text and name in by_dest, (verb, name)
        assert by_dest[name].help in (text, f"off: {text[0].lower() + text[1:]}"), (verb, name, by_dest[name].help)
