"""Bits per byte: a model's summed NLL over the UTF-8 bytes of the target tokens' text, so models of
different tokenizers can be compared on the same text (evaluate.byte_counter, score, and
cross_bits_per_byte for a teacher of another tokenizer)."""
import math

import torch

from stillroom.config import DataConfig
from stillroom.data.examples import build_examples
from stillroom.eval import evaluate
from stillroom.losses import IGNORE_INDEX

from conftest import CORPUS, make_model


@torch.no_grad()
def reference(model, tok, examples):
    """(NLL sum over target tokens, bytes of their text) written out: each run of consecutive
    target tokens decoded, its UTF-8 bytes counted; the NLL from the model's logits one example at a time."""
    nll, n_bytes = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.input_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        run = []
        for k in range(1, len(e.input_ids) + 1):
            y = e.labels[k] if k < len(e.labels) else IGNORE_INDEX
            if y != IGNORE_INDEX:
                nll -= float(logp[k - 1, y])
                run.append(y)
            elif run:
                n_bytes += len(tok.decode(run).encode("utf-8"))
                run = []
    return nll, n_bytes


def sentencepiece_tokenizer():
    """A tiny SentencePiece-style (Metaspace) BPE: not byte-level, so bytes are counted by decoding."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS + ["é 日本 🙂"], vocab_size=300, min_frequency=1,
                           special_tokens=["<pad>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def multi_turn(tmp_path):
    """Conversations whose answers are followed by more turns (targets in runs, not only at the end)."""
    import json

    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"cat {i}?"}, {"role": "assistant", "content": CORPUS[i % 6]},
                          {"role": "user", "content": "and é 日本 🙂?"}, {"role": "assistant", "content": CORPUS[i % 5]}]}
            for i in range(12)]
    p = tmp_path / "turns.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_bits_per_byte_is_the_nll_over_the_bytes_of_the_target_text(tok, chat_file, text_file, tmp_path):
    assert evaluate.byte_counter(tok).by_table   # a byte-level BPE: its table, checked
    student, teacher = make_model(tok, layers=2, seed=1), make_model(tok, layers=2, seed=2, init_range=0.3)
    for path in (chat_file, text_file, multi_turn(tmp_path)):   # answers (chat), every token (packed text), turns
        examples, _ = build_examples(str(path), tok, DataConfig(path=str(path), seq_len=48))
        got = evaluate.score(student, teacher, examples, tok.pad_token_id, batch_size=4, tokenizer=tok)
        s_nll, n_bytes = reference(student, tok, examples)
        t_nll, _ = reference(teacher, tok, examples)
        assert got["bytes"] == n_bytes > 0
        assert math.isclose(got["student_bits_per_byte"], s_nll / math.log(2) / n_bytes, rel_tol=1e-5)
        assert math.isclose(got["teacher_bits_per_byte"], t_nll / math.log(2) / n_bytes, rel_tol=1e-5)
        # the same NLL per token, spread over bytes: bits/byte = log2(perplexity) * tokens / bytes
        assert math.isclose(got["student_bits_per_byte"],
                            math.log2(got["student_perplexity"]) * got["tokens"] / n_bytes, rel_tol=1e-6)


def test_bytes_of_a_tokenizer_that_is_not_byte_level_are_counted_by_decoding():
    sp = sentencepiece_tokenizer()
    count = evaluate.byte_counter(sp)
    assert not count.by_table
    for text in ["The cat sat on the mat.", "é 日本 🙂 and more", "Numbers: one two three"]:
        ids = sp(text, add_special_tokens=False)["input_ids"]
        labels = torch.tensor([ids[1:] + [IGNORE_INDEX]])   # every token but the first is a target
        assert count(labels) == len(sp.decode(ids[1:]).encode("utf-8"))


def test_a_teacher_of_another_tokenizer_is_measured_on_the_same_text(tok, chat_file, tmp_path):
    """cross_bits_per_byte re-tokenizes each example's text for the teacher and counts its tokens
    inside the students' target characters. Given the student's own tokenizer it must find the
    same tokens, so the same bits per byte as scoring the teacher directly."""
    teacher = make_model(tok, layers=2, seed=2, init_range=0.3)
    for path in (chat_file, multi_turn(tmp_path)):
        examples, _ = build_examples(str(path), tok, DataConfig(path=str(path), seq_len=96))
        direct = evaluate.score(teacher, teacher, examples, tok.pad_token_id, batch_size=4, tokenizer=tok)
        cross = evaluate.cross_bits_per_byte(teacher, tok, tok, examples, batch_size=4)
        assert math.isclose(cross, direct["teacher_bits_per_byte"], rel_tol=1e-4)


def test_stillroom_eval_of_a_student_with_another_tokenizer(tok, teacher_dir, chat_file, tmp_path):
    """`stillroom eval` of a cross-tokenizer student: each model in its own tokens on the same text,
    bits per byte side by side (the numbers of score and cross_bits_per_byte), no agreement or KL,
    generation tasks answered by each model with its own tokenizer; --draft refused in one line."""
    import json

    from conftest import run_cli, save

    from stillroom.models import core as models

    from conftest import make_tokenizer

    s_tok = make_tokenizer(vocab_size=290)   # byte-level BPE with merges of its own
    assert s_tok.get_vocab() != tok.get_vocab()
    student = save(make_model(s_tok, layers=2, seed=4, init_range=0.3), s_tok, tmp_path / "student")
    base = ["eval", "--model", student, "--teacher", teacher_dir, "--data", chat_file, "--seq-len", "64",
            "--gen-prompts", "1", "--gen-tokens", "2", "--no-progress"]
    r = run_cli(*base, "--json", "--task", "rouge", "--task-rows", "2", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "each model is measured in its own tokens" in r.stderr
    got = json.loads(r.stdout)
    s, t = got["eval"]["student"], got["eval"]["teacher"]
    examples, _ = build_examples(str(chat_file), s_tok, DataConfig(path=str(chat_file), seq_len=64))
    sm, tm = models.load(str(student)).model, models.load(str(teacher_dir)).model
    own = evaluate.score(sm, None, examples, s_tok.pad_token_id, batch_size=8, tokenizer=s_tok)
    assert math.isclose(s["bits_per_byte"], own["student_bits_per_byte"], rel_tol=1e-5)
    assert math.isclose(s["perplexity"], own["student_perplexity"], rel_tol=1e-5)
    assert math.isclose(t["bits_per_byte"], evaluate.cross_bits_per_byte(tm, tok, s_tok, examples), rel_tol=1e-5)
    assert s["agreement"] is None and s["kl_per_token"] is None and t["perplexity"] is None
    assert set(got["tasks"]["rouge"]["scores"]) == {"teacher", "student"}
    r = run_cli(*base, "--draft")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--draft needs a student with the teacher's tokenizer" \
        in r.stderr, r.stderr
