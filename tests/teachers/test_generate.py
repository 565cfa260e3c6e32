"""The teacher as annotator: prompt sources, de-duplication, several answers, limits, resume."""
import json

import pytest

from stillroom.config import GenerateConfig
from stillroom.errors import UserError
from stillroom.models import core as models
from stillroom.teachers.generate import LocalTeacher, _sha, generate_file, read_prompts

from conftest import assert_user_error, run_cli


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_prompt_sources(tmp_path):
    import datasets

    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Add the numbers.", "input": "2 and 3"},
        {"question": "What is 4 + 4?"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Ciao"}]},
        {"prompt": "Say   hi."}, {"prompt": "Say hi."}]) + "\n")
    got = read_prompts(j)
    assert got[0] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}]
    assert got[1] == [{"role": "user", "content": "What is 4 + 4?"}]
    assert [m["content"] for m in got[2]] == ["Be brief.", "Hi", "Hello", "Bye"]  # last answer dropped
    assert len(got) == 4  # "Say   hi." and "Say hi." are one prompt
    assert len(read_prompts(j, dedup=False)) == 5
    with_system = read_prompts(j, system="You are terse.", limit=2)
    assert all(c[0] == {"role": "system", "content": "You are terse."} for c in with_system)
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"task": "Name a colour."}, {"task": "Name a fruit."}]).save_to_disk(str(folder))
    assert read_prompts(folder, field="task") == [[{"role": "user", "content": "Name a colour."}],
                                                  [{"role": "user", "content": "Name a fruit."}]]
    with pytest.raises(UserError, match="row 1: no non-empty string 'nope'"):
        read_prompts(folder, field="nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt here"}\n')
    with pytest.raises(UserError, match="row 1: no prompt"):
        read_prompts(bad)


def test_several_answers_limits_and_resume(tmp_path, teacher_dir):
    loaded = models.load(str(teacher_dir))
    teacher = LocalTeacher(loaded.model, loaded.tokenizer, str(teacher_dir))
    prompts = [f"Tell me about cat {i}." for i in range(5)] + ["long " * 80]
    g = GenerateConfig(num_answers=3, temperature=1.5, max_new_tokens=5, batch_size=2, max_prompt_tokens=40)
    out = tmp_path / "a.jsonl"
    generate_file(teacher, prompts, out, g, progress=False)
    got = rows(out)
    by_prompt = {}
    for r in got:
        by_prompt.setdefault(r["messages"][0]["content"], []).append(r["messages"][1]["content"])
    assert set(by_prompt) == set(prompts[:5])               # the over-long prompt was skipped
    assert all(1 <= len(v) <= 3 and len(set(v)) == len(v) and all(v) for v in by_prompt.values())
    assert sum(len(v) > 1 for v in by_prompt.values()) >= 3  # sampling gives different answers
    # a run killed mid-batch: rows past the recorded length are a torn write, dropped and redone
    whole = out.read_text()
    progress = json.loads((tmp_path / "a.jsonl.progress.json").read_text())
    assert progress["done"] == 6
    state = {**progress, "done": 4}
    first4 = "".join(line for line in whole.splitlines(keepends=True)
                     if json.loads(line)["messages"][0]["content"] in prompts[:4])
    state["bytes"] = len(first4.encode())
    state["prefix"] = _sha([[{"role": "user", "content": p}] for p in prompts[:4]])
    (tmp_path / "a.jsonl.progress.json").write_text(json.dumps(state))
    out.write_text(first4 + '{"messages": [{"role": "user", "con')
    generate_file(teacher, prompts, out, g, progress=False)
    assert out.read_text() == whole  # same seeds per batch: the redone batch is identical
    # other settings are refused, not mixed in
    with pytest.raises(UserError, match="other settings"):
        generate_file(teacher, prompts, out, g.model_copy(update={"max_new_tokens": 6}), progress=False)


def test_greedy_cannot_give_several_answers(tmp_path, teacher_dir):
    p = tmp_path / "p.txt"
    p.write_text("Hi\n")
    assert_user_error(run_cli("generate", "--teacher", teacher_dir, "--prompts", p, "--out", tmp_path / "o.jsonl",
                              "--num-answers", "2"), r"--num-answers > 1 needs --temperature > 0")
    assert not (tmp_path / "o.jsonl").exists()


def test_a_base_model_without_chat_template_is_prompted_plainly(tmp_path, teacher_dir):
    loaded = models.load(str(teacher_dir))
    tok = loaded.tokenizer
    tok.chat_template = None
    teacher = LocalTeacher(loaded.model, tok, str(teacher_dir))
    assert tok.chat_template is None          # the caller's tokenizer is left as it was
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a cat."}]
    assert teacher.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        tok.bos_token + "Be brief.\n\nQ: Name a cat.\nA:"      # base models (Gemma) need their BOS
    out = tmp_path / "plain.jsonl"
    generate_file(teacher, ["Tell me about the cat.", "Count to three."], out,
                  GenerateConfig(max_new_tokens=12, batch_size=2), progress=False)
    answers = [r["messages"][1]["content"] for r in rows(out)]
    assert len(answers) == 2 and all("\nQ:" not in a for a in answers)


class Scripted:
    """A teacher whose answers are given: records what it was asked, with a context window."""

    def __init__(self, answers, context=None, tokens=len):
        self.answers, self.context, self.asked, self.source = answers, context, [], "scripted"
        self._tokens = tokens

    def prompt_tokens(self, conv):
        return self._tokens(conv[-1]["content"].split())

    def answer(self, convs, gcfg, seed):
        self.asked += [c[-1]["content"] for c in convs]
        return [[self.answers[c[-1]["content"]]] for c in convs]


def test_prompts_that_cannot_fit_the_context_are_skipped_before_any_compute_and_counted(tmp_path):
    long = "word " * 30
    teacher = Scripted({"short one": "fine", long: "never asked", "empty please": "  ",
                        "cut please": {"content": "half an ans", "truncated": True}}, context=24)
    out = tmp_path / "a.jsonl"
    g = GenerateConfig(max_new_tokens=8, batch_size=2)
    r = generate_file(teacher, ["short one", long, "empty please", "cut please"], out, g, progress=False)
    assert long.strip() not in " ".join(teacher.asked)            # 30 words + 8 new > 24: never generated
    assert (r["rows"], r["prompts"], r["skipped"], r["empty"], r["truncated"]) == (2, 4, 1, 1, 1)
    got = rows(out)
    assert [x["messages"][-1]["content"] for x in got] == ["fine", "half an ans"]
    assert "truncated" not in got[0] and got[1]["truncated"] is True
    # the counts survive a rerun that has nothing left to do
    again = generate_file(teacher, ["short one", long, "empty please", "cut please"], out, g, progress=False)
    assert (again["skipped"], again["empty"], again["truncated"]) == (1, 1, 1)
    with pytest.raises(UserError, match="leaves no room for a prompt"):
        generate_file(teacher, ["short one"], tmp_path / "b.jsonl", GenerateConfig(max_new_tokens=24), progress=False)


def test_the_local_teacher_marks_answers_cut_by_max_new_tokens(tmp_path, teacher_dir):
    loaded = models.load(str(teacher_dir))
    teacher = LocalTeacher(loaded.model, loaded.tokenizer, str(teacher_dir))
    assert teacher.context == loaded.model.config.max_position_embeddings
    tok, eos = loaded.tokenizer, loaded.tokenizer.eos_token_id
    # 2 new tokens from a random teacher: cut unless one of them is the end of turn; check both ways
    out = tmp_path / "a.jsonl"
    prompts = [f"Tell me about cat {i}." for i in range(8)]
    r = generate_file(teacher, prompts, out, GenerateConfig(max_new_tokens=2, batch_size=1), progress=False)
    got = {x["messages"][0]["content"]: x.get("truncated", False) for x in rows(out)}
    ended = 0
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new = loaded.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        ended += eos in new.tolist()
        if p in got:
            assert got[p] == (eos not in new.tolist()), p
    assert r["truncated"] == sum(got.values()) and r["truncated"] + r["empty"] == len(prompts) - (len(got) - r["truncated"])
    assert r["truncated"] >= 1


def test_the_closing_line_counts_skipped_and_cut(tmp_path, teacher_dir):
    p = tmp_path / "p.txt"
    p.write_text("Tell me about the cat.\n" + "long " * 600 + "\n")
    r = run_cli("generate", "--teacher", teacher_dir, "--prompts", p, "--out", tmp_path / "o.jsonl",
                "--max-new-tokens", "3", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "for 2 prompts" in r.stdout and "1 prompts skipped (too long)" in r.stdout
    assert "cut at --max-new-tokens 3" in r.stdout


def test_two_processes_write_the_file_of_one_and_a_killed_launch_continues(tmp_path, teacher_dir):
    """`accelerate launch --num_processes 2 -m stillroom generate`: batch j is answered by process
    j % 2 and the main process writes the rounds in order: greedy answers give the one-process
    file byte for byte. A launch killed after its second round continues on rerun to the same file."""
    from conftest import launch

    p = tmp_path / "p.txt"
    p.write_text("".join(f"Tell me about the cat number {i}.\n" for i in range(11)))
    args = lambda out: ["--teacher", teacher_dir, "--prompts", p, "--out", out, "--batch-size", "2",  # noqa: E731
                        "--max-new-tokens", "6", "--no-progress"]
    r = run_cli("generate", *args(tmp_path / "one.jsonl"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    r = launch(2, "-m", "stillroom", "generate", *args(tmp_path / "two.jsonl"))
    assert "for 11 prompts" in r.stdout and r.stdout.count("conversations for") == 1
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    r = launch(2, "-m", "stillroom", "generate", *args(tmp_path / "killed.jsonl"), check=False,
               env={"STILLROOM_FAULT": "generate.batch:2", "STILLROOM_FAULT_RANK": "1"})
    assert r.returncode != 0
    assert json.loads((tmp_path / "killed.jsonl.progress.json").read_text())["done"] in (4, 8)
    launch(2, "-m", "stillroom", "generate", *args(tmp_path / "killed.jsonl"))
    assert (tmp_path / "killed.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
