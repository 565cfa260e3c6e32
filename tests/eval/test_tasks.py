"""Generation tasks (`stillroom eval --task rouge|exact_match`): the scorers against hand-worked
examples, batched greedy answers equal to one-at-a-time ones, and what a user sees."""
import json

import pytest

from stillroom.errors import UserError
from stillroom.eval import tasks

from conftest import assert_user_error, make_model, run_cli


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat is on the mat": the cat on the mat (5 of 6 words each)
    assert tasks.rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # stemmed: cats -> cat, running -> run; LCS of [run, cat] and [cat, run] is one word of two
    assert tasks.rouge_l("running cats", ["cat run"]) == pytest.approx(0.5)
    # the best over several references; "ran" is not stemmed to "run": only "cat" is shared (1/3, 1/3)
    assert tasks.rouge_l("a cat ran", ["dogs bark", "the cat runs"]) == pytest.approx(1 / 3)
    assert tasks.rouge_l("", ["anything"]) == 0.0
    assert tasks.rouge_l("Same Words, here!", ["same words here"]) == pytest.approx(1.0)   # case, punctuation


@pytest.mark.parametrize("text, strict, flexible", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72", "72"),
    ("It costs 1,000 dollars in all.\n#### 1,000", "1000", "1000"),
    ("So the total is $1,234.50.", None, "1234.50"),
    ("She has 3 apples, then 5, so she owes -7.", None, "-7"),
    ("#### -12\nand later 4", "-12", "4"),
    ("No numbers here.", None, None),
    ("#### 18.", "18", "18"),
])
def test_final_numbers_as_gsm8k_extracts_them(text, strict, flexible):
    assert tasks.final_number(text, "strict") == strict
    assert tasks.final_number(text, "flexible") == flexible


def test_exact_match_strict_and_flexible():
    ref = "Half of 2,000 is 1,000.\n#### 1,000"
    assert tasks.exact_match("1000 / 1 = 1000\n#### 1000", ref) == {"strict": True, "flexible": True}
    assert tasks.exact_match("The answer is $1,000.", ref) == {"strict": False, "flexible": True}
    assert tasks.exact_match("#### 1000 then I said 7", ref) == {"strict": True, "flexible": False}
    assert tasks.exact_match("I think 999", ref) == {"strict": False, "flexible": False}


def test_batched_greedy_answers_equal_one_at_a_time(tok):
    model = make_model(tok, init_range=0.3).eval()
    prompts = [[{"role": "user", "content": p}] for p in
               ("Hi.", "Tell me about the cat on the mat, and the moon.", "Count: one two three four five.",
                "A language model predicts", "Rain?")]
    one = tasks.answers(model, tok, prompts, 8, batch_size=1, progress=False)
    batched = tasks.answers(model, tok, prompts, 8, batch_size=3, progress=False)
    assert batched == one and len(one) == 5 and any(one)


def _rows(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_read_items_takes_the_last_user_turn_and_every_reference(tmp_path):
    p = _rows(tmp_path, "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name a cat"},
                      {"role": "assistant", "content": "Tom"}], "references": ["Felix", 3]},
        {"prompt": "2+2?", "response": "4"}])
    a, b = tasks.read_items(str(p), "rouge")
    assert a.prompt[-1] == {"role": "user", "content": "Name a cat"} and len(a.prompt) == 4
    assert a.references == ["Tom", "Felix"] and b.references == ["4"]
    assert len(tasks.read_items(str(p), "rouge", limit=1)) == 1
    with pytest.raises(UserError, match="row 2: the answer does not end in '#### <number>'"):
        tasks.read_items(str(_rows(tmp_path, "g.jsonl", [{"question": "q", "answer": "#### 3"},
                                                          {"question": "q", "answer": "three"}])), "exact_match")


def test_eval_tasks_from_the_command_line(tmp_path, teacher_dir, chat_file, tiny_student):
    gsm = _rows(tmp_path, "gsm.jsonl", [{"question": f"What is {i} + {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i:,}"}
                                        for i in (3, 600, 7)])
    base = ["eval", "--model", tiny_student / "final", "--teacher", teacher_dir, "--max-new-tokens", "6", "--no-progress"]
    r = run_cli(*base, "--data", chat_file, "--task", "rouge", "--task-rows", "5", "--json", "--out", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)["tasks"]["rouge"]
    assert got["rows"] == 5 and set(got["scores"]) == {"teacher", "student"}
    assert 0 <= got["scores"]["student"]["rougeL"] <= 1 and 0 <= got["scores"]["student"]["rougeL_vs_teacher"] <= 1
    lines = [json.loads(x) for x in (tmp_path / "r.rouge.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and lines[0]["prompt"] == "Tell me about the cat number 0."
    assert set(lines[0]) == {"line", "prompt", "references", "teacher", "student"}
    mean = sum(x["student"]["rougeL"] for x in lines) / 5
    assert got["scores"]["student"]["rougeL"] == pytest.approx(mean)        # the table is the rows' mean
    r = run_cli(*base, "--data", gsm, "--task", "exact_match")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exact match (strict" in r.stdout and "(3 rows, greedy answers)" in r.stdout
    assert "pass --out FILE.json" in r.stdout
    # bad input: one line, exit 2, nothing written
    assert_user_error(run_cli(*base, "--data", gsm, "--task", "bleu"), "invalid choice: 'bleu'")
    prompts_only = _rows(tmp_path, "p.jsonl", [{"prompt": "Say hi."}])
    assert_user_error(run_cli(*base, "--data", prompts_only, "--task", "rouge", "--out", tmp_path / "x.json"),
                      "row 1: no reference answer")
    assert_user_error(run_cli(*base, "--data", chat_file, "--task", "exact_match"), "does not end in '#### <number>'")
    assert not (tmp_path / "x.json").exists()


def test_a_run_scores_its_tasks_before_and_after_and_reports_them(tmp_path, teacher_dir, chat_file):
    qa = _rows(tmp_path, "qa.jsonl", [{"prompt": f"Tell me about the moon {i}.", "response": "The moon is bright."}
                                      for i in range(3)])
    out = tmp_path / "run"
    args = ["distill", f"teacher.model={teacher_dir}", f"data.path={chat_file}", f"train.output_dir={out}",
            "student.num_layers=2", "data.seq_len=64", "train.max_steps=2", "eval.gen_tokens=2",
            "eval.gen_prompts=1", "eval.tasks=[rouge]", f"eval.task_data={qa}", "eval.max_new_tokens=5",
            "--no-progress"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "task rouge (tasks-rouge.jsonl)" in r.stdout and "student before" in r.stdout
    got = json.loads((out / "final" / "metrics.json").read_text())["tasks"]["rouge"]
    assert set(got["scores"]) == {"teacher", "student before", "student after"} and got["rows"] == 3
    assert "rougeL_vs_teacher" in got["scores"]["student after"] and "rougeL_vs_teacher" not in got["scores"]["teacher"]
    rows = [json.loads(x) for x in (out / "tasks-rouge.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in rows] == [f"Tell me about the moon {i}." for i in range(3)]
    assert run_cli("report", out).returncode == 0
    page = (out / "report.html").read_text()
    assert "Task rouge (3 rows, greedy answers)" in page and "Sample answers" in page
    assert "Tell me about the moon 2." in page and "The moon is bright." in page
    # rows to score against are asked for, and read, before anything is written
    other = tmp_path / "other"
    bad = [a.replace(f"eval.task_data={qa}", "eval.max_new_tokens=5").replace(str(out), str(other)) for a in args]
    assert_user_error(run_cli(*bad), "eval.tasks needs rows with reference answers .* set eval.task_data")
    no_refs = _rows(tmp_path, "p.jsonl", [{"prompt": "Say hi."}])
    bad = [a.replace(str(qa), str(no_refs)).replace(str(out), str(other)) for a in args]
    assert_user_error(run_cli(*bad), "row 1: no reference answer")
    assert not other.exists()
