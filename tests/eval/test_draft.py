"""The student as the teacher's draft model (`stillroom eval --draft`): the greedy output is the
teacher's own, acceptance lies in [0, 1], and the tokens are accounted for."""
import copy
import json
import math

import torch

from stillroom.eval.draft import draft_check

from conftest import make_model, run_cli


def prompts(tok):
    return [tok(p)["input_ids"] for p in ("The cat sat on", "Numbers: one two", "Rain falls, rivers")]


def test_a_perfect_draft_is_always_accepted(tok):
    teacher = make_model(tok, init_range=0.3).eval()
    d = draft_check(teacher, copy.deepcopy(teacher), prompts(tok), 12, tok.pad_token_id, draft_tokens=5)
    # every step: 5 drafted tokens accepted + 1 of the teacher's own -> 12 tokens in 2 steps per prompt
    assert d["all_identical"] and d["new_tokens"] == 36
    assert d["teacher_steps"] == 3 * math.ceil(12 / 6) and d["proposed"] == 5 * d["teacher_steps"]
    assert d["acceptance_rate"] == 1.0 and d["accepted_per_step"] == 5.0 and d["tokens_per_teacher_pass"] == 6.0


def test_an_imperfect_draft_keeps_the_teachers_output_and_accounts_for_every_token(tok):
    teacher = make_model(tok, init_range=0.3).eval()
    student = copy.deepcopy(teacher)
    for layer in student.model.layers[2:]:          # a worse copy: it agrees on some tokens, not all
        layer.mlp.down_proj.weight.data.mul_(0.3)
    ids = prompts(tok)
    before = student.generation_config
    d = draft_check(teacher, student, ids, 16, tok.pad_token_id, draft_tokens=4)
    assert d["all_identical"] and d["identical"] == 3
    assert 0.0 < d["acceptance_rate"] < 1.0
    assert d["accepted"] <= d["proposed"] <= 4 * d["teacher_steps"]
    assert d["teacher_steps"] <= d["new_tokens"] <= 5 * d["teacher_steps"]
    plain = [teacher.generate(torch.tensor([x]), max_new_tokens=16, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(x):] for x in ids]
    assert d["new_tokens"] == sum(len(p) for p in plain)
    assert student.generation_config is before and before.num_assistant_tokens != 4   # the student's own, restored


def test_eval_draft_from_the_command_line(teacher_dir, chat_file, tiny_student):
    base = ["eval", "--model", tiny_student / "final", "--teacher", teacher_dir, "--data", chat_file, "--draft",
            "--gen-tokens", "8", "--gen-prompts", "2", "--no-progress"]
    r = run_cli(*base, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)["draft"]
    assert d["prompts"] == 2 and d["new_tokens"] > 0 and 0 <= d["acceptance_rate"] <= 1 and d["speedup"] > 0
    assert d["all_identical"], d
    r = run_cli(*base)
    assert r.returncode == 0 and "acceptance rate" in r.stdout and "output identical to the teacher's" in r.stdout
