"""The row formats users have (stillroom/data/rows.py): each common instruction format reads as the same
conversation in every command; anything else is named with data.fields / --prompt-field; a file whose
rows are all unreadable says which keys they do have."""
import json

import pytest

from stillroom.config import DataConfig, GenerateConfig
from stillroom.data.examples import build_examples
from stillroom.errors import UserError
from stillroom.teachers.generate import generate_file, read_prompts

from conftest import assert_user_error, run_cli, tiny_overrides

PROMPT, ANSWER = "Add two and three.", "Two and three make five."

# The same prompt and answer in every format a user may have.
SAME = {
    "prompt/response": {"prompt": PROMPT, "response": ANSWER},
    "prompt/completion": {"prompt": PROMPT, "completion": ANSWER},
    "alpaca": {"instruction": PROMPT, "input": "", "output": ANSWER},
    "gsm8k": {"question": PROMPT, "answer": ANSWER},
    "openai messages": {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]},
    "sharegpt": {"conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": ANSWER}]},
}


def write(path, rows, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def examples(path, tok, **data):
    got, _ = build_examples(str(path), tok, DataConfig(path=str(path), seq_len=128, **data))
    return [(e.input_ids, e.labels) for e in got]


@pytest.fixture
def chat_tok(tok):
    import copy

    from conftest import CHATML
    t = copy.copy(tok)
    t.chat_template = CHATML
    return t


@pytest.mark.parametrize("name", list(SAME))
def test_every_common_format_reads_as_the_same_example(name, tmp_path, chat_tok):
    want = examples(write(tmp_path / "want.jsonl", [SAME["openai messages"]]), chat_tok)
    assert examples(write(tmp_path / "f.jsonl", [SAME[name]]), chat_tok) == want
    # a UTF-8 byte-order mark at the start of the file is not part of the first row
    assert examples(write(tmp_path / "bom.jsonl", [SAME[name]], bom=True), chat_tok) == want


def test_alpaca_input_follows_the_instruction_after_a_blank_line(tmp_path, chat_tok):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    got = examples(write(tmp_path / "a.jsonl", [row]), chat_tok)
    want = examples(write(tmp_path / "b.jsonl", [{"prompt": "Add the numbers.\n\n2 and 3", "response": "5"}]), chat_tok)
    assert got == want


def test_other_keys_are_named_with_data_fields(tmp_path, chat_tok):
    want = examples(write(tmp_path / "want.jsonl", [SAME["openai messages"]]), chat_tok)
    f = write(tmp_path / "f.jsonl", [{"query": PROMPT, "reply": ANSWER}])
    assert examples(f, chat_tok, fields={"prompt": "query", "response": "reply"}) == want
    t = write(tmp_path / "t.jsonl", [{"body": "The cat sat on the mat. " * 3}])
    assert examples(t, chat_tok, fields={"text": "body"}) == examples(
        write(tmp_path / "t2.jsonl", [{"text": "The cat sat on the mat. " * 3}]), chat_tok)


def test_sharegpt_keeps_the_system_turn_and_refuses_unknown_speakers(tmp_path, chat_tok):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": PROMPT},
                               {"from": "gpt", "value": ANSWER}]}]
    want = examples(write(tmp_path / "w.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                               *SAME["openai messages"]["messages"]]}]), chat_tok)
    assert examples(write(tmp_path / "s.jsonl", rows), chat_tok) == want
    bad = write(tmp_path / "bad.jsonl", [SAME["openai messages"],
                                         {"conversations": [{"from": "narrator", "value": "x"}]}])
    with pytest.raises(UserError, match="unknown speaker 'narrator'"):
        examples(bad, chat_tok)


def test_turns_rows_are_prompts_distill_cannot_learn_from(tmp_path, chat_tok):
    f = write(tmp_path / "mt.jsonl", [SAME["openai messages"], {"turns": ["Hi.", "And then?"]}])
    with pytest.raises(UserError, match="no assistant message to learn from.*stillroom generate"):
        examples(f, chat_tok)


def test_a_file_whose_rows_are_all_unreadable_names_their_keys(tmp_path, teacher_dir):
    f = write(tmp_path / "odd.jsonl", [{"query": "a", "reply": "b"}] * 3)
    r = run_cli("distill", *tiny_overrides(teacher_dir, f, tmp_path / "out"), "--no-progress")
    assert_user_error(r, r"no row of .* is usable .* keys query, reply: name the prompt and response with data.fields")
    assert "skip_bad_rows" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_generate_reads_every_format_and_answers_turns_in_order(tmp_path):
    f = write(tmp_path / "p.jsonl", [
        SAME["sharegpt"], SAME["alpaca"], SAME["gsm8k"],
        {"turns": ["Name a colour.", "Now a fruit.", "Now a tree."]}], bom=True)
    got = read_prompts(f, dedup=False)
    assert got[:3] == [[{"role": "user", "content": PROMPT}]] * 3   # answers in the rows are dropped
    assert [m["content"] for m in got[3]] == ["Name a colour.", "Now a fruit.", "Now a tree."]

    class Teacher:   # answers each question with a word and records the conversation it saw
        source, context, seen = "scripted", None, []

        def prompt_tokens(self, conv):
            return 1

        def answer(self, convs, gcfg, seed):
            self.seen += [[m["content"] for m in c] for c in convs]
            return [[{"Name a colour.": "Red.", "Now a fruit.": "Apple.", "Now a tree.": "Oak."}
                     .get(c[-1]["content"], "Five.")] for c in convs]

    t = Teacher()
    out = tmp_path / "a.jsonl"
    r = generate_file(t, got, out, GenerateConfig(batch_size=4, dedup=False), progress=False)
    assert r["rows"] == 4
    last = json.loads(out.read_text().splitlines()[-1])["messages"]
    assert [(m["role"], m["content"]) for m in last] == [
        ("user", "Name a colour."), ("assistant", "Red."), ("user", "Now a fruit."), ("assistant", "Apple."),
        ("user", "Now a tree."), ("assistant", "Oak.")]
    # each follow-up was asked with the answers before it
    assert ["Name a colour.", "Red.", "Now a fruit."] in t.seen
    with pytest.raises(UserError, match="one answer per turn"):
        generate_file(t, got, tmp_path / "b.jsonl", GenerateConfig(num_answers=2, temperature=1.0), progress=False)


def test_generate_prompt_field_takes_a_list_of_turns(tmp_path):
    f = write(tmp_path / "p.jsonl", [{"qs": ["One?", "Two?"]}])
    assert [m["content"] for m in read_prompts(f, field="qs")[0]] == ["One?", "Two?"]
