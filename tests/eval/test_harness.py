"""EleutherAI's lm-evaluation-harness through `stillroom eval --lm-eval`, offline: the task
stillroom ships, scored for the teacher and the student; unknown and network-only tasks refused."""
import json

import pytest

from conftest import assert_user_error, run_cli

pytest.importorskip("lm_eval")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_the_shipped_task_offline_for_teacher_and_student(tmp_path, teacher_dir, chat_file, tiny_student):
    base = ["eval", "--model", tiny_student / "final", "--teacher", teacher_dir, "--data", chat_file, "--no-progress"]
    r = run_cli(*base, "--lm-eval", "stillroom_facts", "--json", env=OFFLINE)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)["lm_eval"]
    for who in ("teacher", "student"):
        m = got[who]["stillroom_facts"]
        # 24 four-way questions: accuracy is a multiple of 1/24, with its standard error
        assert 0 <= m["acc"] <= 1 and round(m["acc"] * 24, 6).is_integer() and m["acc_stderr"] > 0, m
        assert 0 <= m["acc_norm"] <= 1
    r = run_cli(*base, "--lm-eval", "stillroom_facts", env=OFFLINE)
    assert r.returncode == 0 and "stillroom_facts acc" in r.stdout, r.stderr[-2000:]
    assert "loglikelihood requests" not in r.stderr      # --no-progress hides the harness's bars too
    # bad input: one line each, exit 2, before any model is loaded
    assert_user_error(run_cli(*base, "--lm-eval", "no_such_task", env=OFFLINE), "unknown lm-eval task 'no_such_task'")
    assert_user_error(run_cli(*base, "--lm-eval", "arc_easy", env=OFFLINE),
                      "lm-eval could not load the tasks arc_easy .*needs network")
    assert_user_error(run_cli(*base, "--include-path", tmp_path, env=OFFLINE), "pass --lm-eval TASKS too")


def test_a_task_of_ones_own_from_include_path(tmp_path, teacher_dir, chat_file):
    from stillroom.eval import harness
    folder = tmp_path / "mine"
    folder.mkdir()
    rows = folder / "yesno.jsonl"
    rows.write_text("".join(json.dumps({"q": f"Is {i} even?", "a": int(i % 2 == 0)}) + "\n" for i in range(6)))
    (folder / "yesno.yaml").write_text(
        "task: my_yesno\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(rows) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['no', 'yes']\n"
        "doc_to_target: '{{a}}'\nmetric_list:\n  - metric: acc\n")
    tasks = harness.task_dict(["my_yesno"], str(folder))
    from stillroom.models import core as models
    t = models.load(str(teacher_dir))
    got = harness.run(tasks, {"teacher": (t.model, t.tokenizer)}, batch_size=4)
    assert set(got["teacher"]["my_yesno"]) >= {"acc", "acc_stderr"}
    assert round(got["teacher"]["my_yesno"]["acc"] * 6, 6).is_integer()
