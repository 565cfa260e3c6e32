import json

import pytest

from stillroom.config import DataConfig
from stillroom.data.examples import IGNORE_INDEX, build_examples, collate, micro_batch, split_examples
from stillroom.errors import UserError


def cfg(**kw):
    return DataConfig(**{"seq_len": 32, **kw})


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_is_packed_into_fixed_blocks(text_file, tok):
    ex, _ = build_examples(str(text_file), tok, cfg())
    total = len(tok(text_file.read_text(), add_special_tokens=False)["input_ids"])
    assert all(len(e.input_ids) == 32 for e in ex[:-1])
    assert sum(len(e.input_ids) for e in ex) == total
    assert all(e.labels == e.input_ids for e in ex)


def test_chat_loss_only_on_assistant_tokens(tmp_path, tok):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a cat."},
        {"role": "assistant", "content": "The cat sat."},
        {"role": "user", "content": "And a number?"},
        {"role": "assistant", "content": "seven"}]}])
    (e,), _ = build_examples(str(p), tok, cfg(seq_len=256))
    learned = tok.decode([t for t in e.labels if t != IGNORE_INDEX])
    assert learned == "The cat sat.<|im_end|>\nseven<|im_end|>\n"
    assert "Name a cat" not in learned and "Be brief" not in learned


def test_prompt_response_rows(tmp_path, tok):
    p = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Say one.", "response": "one two"}])
    (e,), _ = build_examples(str(p), tok, cfg(seq_len=256))
    assert tok.decode([t for t in e.labels if t != IGNORE_INDEX]).startswith("one two")
    assert tok.decode(e.input_ids).startswith("<|im_start|>user\nSay one.")


def test_text_rows_in_jsonl_are_packed(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "The cat sat on the mat."}] * 10)
    ex, _ = build_examples(str(p), tok, cfg(seq_len=16))
    assert len(ex) > 1 and all(len(e.input_ids) <= 16 for e in ex)


def test_bad_rows_are_an_error_naming_them(tmp_path, tok):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "{not json", {"foo": 1},
                                             {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError) as e:
        build_examples(str(p), tok, cfg())
    msg = str(e.value)
    assert "3 of 4 rows" in msg and "row 2 (invalid JSON" in msg and "3 (needs" in msg
    assert "4 (no assistant message" in msg and "skip_bad_rows" in msg


def test_bad_rows_skipped_and_reported_when_asked(tmp_path, tok, caplog):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "The cat sat."}, "{oops"])
    ex, report = build_examples(str(p), tok, cfg(skip_bad_rows=True))
    assert len(ex) == 1 and report.bad == [(2, report.bad[0][1])]
    assert "1 of 2 rows" in caplog.text


def test_empty_and_missing_files(tmp_path, tok):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(UserError, match="is empty"):
        build_examples(str(tmp_path / "e.txt"), tok, cfg())
    with pytest.raises(UserError, match="not found"):
        build_examples(str(tmp_path / "nope.jsonl"), tok, cfg())


def test_hf_dataset_folder(tmp_path, tok):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": f"Q{i}", "response": "The cat sat."} for i in range(5)])
    ds.save_to_disk(str(tmp_path / "ds"))
    ex, report = build_examples(str(tmp_path / "ds"), tok, cfg(seq_len=128))
    assert len(ex) == 5 and report.rows == 5


def test_split_is_deterministic_and_disjoint(chat_file, tok):
    ex, _ = build_examples(str(chat_file), tok, cfg(seq_len=128))
    a_train, a_eval = split_examples(ex, 0.25, seed=3)
    b_train, b_eval = split_examples(ex, 0.25, seed=3)
    assert [e.input_ids for e in a_eval] == [e.input_ids for e in b_eval]
    assert len(a_eval) == 10 and len(a_train) == 30
    _, c_eval = split_examples(ex, 0.25, seed=4)
    assert [e.input_ids for e in c_eval] != [e.input_ids for e in a_eval]


def test_collate_pads_right_and_masks_padding(tok):
    from stillroom.data.examples import Example

    b = collate([Example([1, 2, 3], [1, 2, 3]), Example([4], [IGNORE_INDEX])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[1, 2, 3], [IGNORE_INDEX] * 3]


def test_micro_batches_cover_each_epoch_once():
    from stillroom.data.examples import Example

    ex = [Example([i], [i]) for i in range(12)]
    epoch0 = [e.input_ids[0] for k in range(3) for e in micro_batch(ex, k, 4, seed=0)]
    assert sorted(epoch0) == list(range(12))
    assert [e.input_ids for e in micro_batch(ex, 5, 4, 0)] == [e.input_ids for e in micro_batch(ex, 5, 4, 0)]


def test_a_cut_answer_teaches_no_end_of_turn(tmp_path, tok):
    from stillroom.config import DataConfig
    from stillroom.data.examples import build_examples

    p = tmp_path / "d.jsonl"
    conv = [{"role": "user", "content": "Tell me about the cat."}, {"role": "assistant", "content": "The cat sat on"}]
    p.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"messages": conv, "truncated": True}) + "\n"
                 + json.dumps({"prompt": "Tell me", "response": "The cat", "truncated": True}) + "\n")
    whole, cut, pair = build_examples(str(p), tok, DataConfig(seq_len=64, eval_fraction=0.0))[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    learned = [t for t in whole.labels if t != -100]
    assert end in learned                                               # a whole answer: its end is a target
    assert end not in [t for t in cut.labels if t != -100] and end not in [t for t in pair.labels if t != -100]
    assert tok.decode([t for t in cut.labels if t != -100]) == "The cat sat on"
    assert cut.input_ids == whole.input_ids                            # the same text; only the targets differ


def test_the_data_order_is_shuffled_once_per_epoch_and_unchanged():
    """micro_batch keeps its order (the reference below is the order every earlier run used), but
    shuffles once per epoch instead of once per micro-batch."""
    import random

    from stillroom.data.examples import epoch_order, micro_batch

    examples = list(range(103))

    def reference(index, batch_size, seed):
        per_epoch = max(1, len(examples) // batch_size)
        epoch, k = divmod(index, per_epoch)
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return [examples[i] for i in order[k * batch_size:(k + 1) * batch_size]]

    epoch_order.cache_clear()
    got = [micro_batch(examples, i, 4, 7) for i in range(60)]
    assert got == [reference(i, 4, 7) for i in range(60)]
    info = epoch_order.cache_info()
    assert info.misses == 3 and info.hits == 57   # 60 micro-batches of 25 an epoch: three shuffles


def test_a_huge_row_is_tokenized_only_as_far_as_its_kept_tokens(tmp_path, tok, monkeypatch):
    """A 2 MB response cut to seq_len gives the same example as tokenizing it whole, without
    tokenizing it whole (a 20 MB row took a minute)."""
    import copy

    from stillroom.config import DataConfig
    from stillroom.data import examples as data
    from conftest import CHATML
    t = copy.copy(tok)
    t.chat_template = CHATML
    words = " ".join(f"word{i % 997} and-more{i % 13}" for i in range(150_000))
    rows = tmp_path / "huge.jsonl"
    rows.write_text(json.dumps({"prompt": "Summarize this.", "response": words}) + "\n")
    cfg = DataConfig(path=str(rows), seq_len=64)

    class Counting:   # the tokenizer, recording how much text it was asked to encode
        def __init__(self, inner):
            self.inner, self.sizes = inner, []

        def __call__(self, text, **k):
            self.sizes.append(len(text))
            return self.inner(text, **k)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    counting = Counting(t)
    fast, _ = data.build_examples(str(rows), counting, cfg)
    assert max(counting.sizes) < 100_000   # prefixes only, never the 2 MB row
    longest = []
    from stillroom.data import render

    real = render.encode_head
    monkeypatch.setattr(render, "encode_head", lambda tk, text, limit: (longest.append(len(text)), real(tk, text, None))[1])
    whole, _ = data.build_examples(str(rows), t, cfg)
    assert [(e.input_ids, e.labels) for e in fast] == [(e.input_ids, e.labels) for e in whole]
    assert len(fast[0].input_ids) == 64 and max(longest) > 2_000_000


# Templates as real models write them (shortened): whether each may be rendered by filling its
# shapes (its text depends on a content only by printing it and by its emptiness) -- and either way
# render_chat must give exactly the tokenizer's own result.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {
    "chatml": (CHATML, True),
    # Qwen2.5-like: an assistant turn's content printed only when it is not empty
    "if_content": ("{%- for message in messages %}{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
                   "{%- if message.content %}{{- '\n' + message.content }}{%- endif %}{{- '<|im_end|>\n' }}"
                   "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
                   "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
                   "{%- endif %}", True),
    # Llama-3-like: contents trimmed
    "trim": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n\n' + message['content'] | trim "
             "+ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}",
             False),
    # Qwen3-like: an answer's reasoning dropped from earlier turns
    "think": ("{%- for message in messages %}{%- set content = message.content %}{%- if message.role == 'assistant' "
              "and '</think>' in content and not loop.last %}{%- set content = content.split('</think>')[-1] %}"
              "{%- endif %}{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}", False),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_fast_rendering_and_encoding_equal_the_tokenizers_own(tok, name):
    """render_chat calls the compiled chat template and the Rust tokenizer directly, fills a
    template's shapes instead of rendering each row where the template allows it, and finds the
    answers' tokens from character positions (each checked once per tokenizer): ids and labels
    equal those of apply_chat_template + tokenizer(...) with offsets on varied conversations (system
    turns, several assistant turns, an empty answer, reasoning tags, accents, emoji, special tokens
    in text), for templates that print contents verbatim and for ones that trim or split them."""
    import copy

    from stillroom.data.examples import IGNORE_INDEX
    from stillroom.data.render import _encoder, _labeller, _shapes, _verbatim_content, chat_renderer, render_chat

    template, verbatim = TEMPLATES[name]
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    assert chat_renderer(tok).__name__ == "fast" and _encoder(tok).__name__ == "fast"
    assert _labeller(tok).__name__ == "fast"
    assert _verbatim_content(template) == verbatim and (_shapes(tok, chat_renderer(tok)) is not None) == verbatim
    convs = [
        [{"role": "user", "content": "Tell me about the cat."}, {"role": "assistant", "content": "It sat on the mat."}],
        [{"role": "system", "content": "Be brief. <|im_end|> is text here"}, {"role": "user", "content": "é 日本 🙂"},
         {"role": "assistant", "content": "  spaced\n\nlines  "}, {"role": "user", "content": "again?"},
         {"role": "assistant", "content": "Yes: the moon."}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hmm</think> 42"},
         {"role": "user", "content": ""}, {"role": "assistant", "content": ""},
         {"role": "user", "content": "and?"}, {"role": "assistant", "content": "<think>so</think>43 🙂"}],
    ]
    for conv in convs:
        text = tok.apply_chat_template(conv, tokenize=False)
        e = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [(len(tok.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True)),
                  len(tok.apply_chat_template(conv[:i + 1], tokenize=False)))
                 for i, m in enumerate(conv) if m["role"] == "assistant"]
        want = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
                for t, (s, _) in zip(e["input_ids"], e["offset_mapping"])]
        ids, labels = render_chat(tok, conv)
        assert ids == e["input_ids"] and labels == want
        assert any(x != IGNORE_INDEX for x in labels) and any(x == IGNORE_INDEX for x in labels)


def test_a_shape_the_samples_did_not_show_is_rendered_not_filled(tok):
    """A template checked on the sample conversations (user, assistant, system) may still print a
    content of another role twice: that conversation's shape cannot be filled, so it is rendered,
    and ids and labels equal the tokenizer's own (it raised mid-build before)."""
    import copy

    from stillroom.data.render import _shapes, chat_renderer, render_chat

    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for message in messages %}{% if message['role'] == 'tool' %}{{ '<|im_start|>tool\n' + "
                         "message['content'] + '\n' + message['content'] + '<|im_end|>\n' }}{% else %}"
                         "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert _shapes(tok, chat_renderer(tok)) is not None   # the samples fill
    conv = [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "rain, 12 C"},
            {"role": "assistant", "content": "It rains: 12 C."}]
    text = tok.apply_chat_template(conv, tokenize=False)
    e = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    a = len(tok.apply_chat_template(conv[:2], tokenize=False, add_generation_prompt=True))
    want = [t if s >= a else IGNORE_INDEX for t, (s, _) in zip(e["input_ids"], e["offset_mapping"])]
    assert render_chat(tok, conv) == (e["input_ids"], want)
