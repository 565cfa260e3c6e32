"""The methods end to end on tiny models: weighted term lists, intermediate layers with
projections, several teachers (mixture, routing), on-policy rollouts, balancing, per-token
weights, cross-tokenizer ULD, and the two-stage recipe."""
import json

import pytest
import torch
from safetensors.torch import load_file

from stillroom.recipes import load_config
from stillroom.data.examples import Example
from stillroom.errors import UserError
from stillroom.losses import IGNORE_INDEX
from stillroom.objectives import methods
from stillroom.run.distill import distill

from conftest import CORPUS, make_model, make_tokenizer, save, tiny_overrides


def _run(tmp_path, teacher_dir, data, name, *extra, **kw):
    cfg = load_config(None, tiny_overrides(teacher_dir, data, tmp_path / name, **kw) + list(extra))
    return cfg, distill(cfg, progress=False)


# Equalities between two code paths (the Hybrid kernel and the general path, a live teacher and
# its cache) hold to fp32 rounding: those tests train in fp32 (under bf16 autocast, the auto choice
# on a CPU with native bf16, each path rounds its logits differently).
FP32 = "train.mixed_precision=no"


def _log(tmp_path, name):
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"step"' in x]


def _weights(path):
    return load_file(str(path / "final" / "model.safetensors"))


def test_terms_ce_and_kl_equal_the_alpha_hybrid(tmp_path, teacher_dir, chat_file):
    _run(tmp_path, teacher_dir, chat_file, "alpha", "loss.alpha=0.7")
    _run(tmp_path, teacher_dir, chat_file, "terms", "loss.terms={ce: 0.3, forward_kl: 0.7}")
    a, b = _weights(tmp_path / "alpha"), _weights(tmp_path / "terms")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("terms", ["{ce: 0.3, forward_kl: 0.5, reverse_kl: 0.2}", "{ce: 0.5, hard: 0.5, forward_kl: 0.5}"])
def test_several_teacher_terms_train(tmp_path, teacher_dir, chat_file, terms):
    """Issue 14, defect 1: two or more teacher terms crashed at step 1 ("too many values to
    unpack"). Each step's loss is the weighted sum of the raw terms it logs."""
    cfg, _ = _run(tmp_path, teacher_dir, chat_file, "t", f"loss.terms={terms}")
    weights = cfg.loss.terms
    rows = _log(tmp_path, "t")
    assert len(rows) == 3
    for r in rows:
        assert set(r["terms"]) == set(weights)
        assert r["loss"] == pytest.approx(sum(w * r["terms"][k] for k, w in weights.items()), rel=1e-4)


def test_hidden_and_attention_terms_train_and_save_projections(tmp_path, teacher_dir, chat_file):
    _, m = _run(tmp_path, teacher_dir, chat_file, "h",
                "loss.terms={ce: 0.3, forward_kl: 0.5, hidden_cosine: 0.2, attention: 0.1}")
    rows = _log(tmp_path, "h")
    assert set(rows[-1]["terms"]) == {"ce", "forward_kl", "hidden_cosine", "attention"}
    assert all(r["terms"]["hidden_cosine"] >= 0 and r["terms"]["attention"] >= 0 for r in rows)
    final = tmp_path / "h" / "final"
    proj = load_file(str(final / "projections.safetensors"))
    pairs = json.loads((final / "projections.json").read_text())["layer_map"]
    assert pairs == [[0, 0], [1, 3]]          # the teacher layers the 2-layer student was cut from
    assert [proj[f"proj.{k}"].shape for k in range(2)] == [(32, 32)] * 2
    # identity-initialised, then trained: moved, but not far
    assert not torch.equal(proj["proj.0"], torch.eye(32))


def test_hidden_terms_under_two_processes_equal_one(tmp_path, teacher_dir, chat_file):
    """Issue 14, defect 2: hidden-state terms crashed under 2 processes (the projections wrapped in
    DDP, then read unwrapped). Now 2 gloo processes end with the student and the projections of
    one process taking the same global batch as 2 micro-batches (their gradients are synced)."""
    from conftest import launch
    terms = "loss.terms={ce: 0.5, forward_kl: 0.3, hidden_mse: 0.2}"
    launch(2, "-m", "stillroom", "distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "two"), terms,
           "--no-progress")
    _run(tmp_path, teacher_dir, chat_file, "one", terms, "train.grad_accum=2")
    for name in ("model.safetensors", "projections.safetensors"):
        a = load_file(str(tmp_path / "one" / "final" / name))
        b = load_file(str(tmp_path / "two" / "final" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


def test_projection_shapes_follow_the_widths(tmp_path, teacher_dir, chat_file):
    _run(tmp_path, teacher_dir, chat_file, "w", "student.init=config", "student.hidden_size=16",
         "student.num_heads=2", "student.num_layers=2", "loss.terms={ce: 0.5, hidden_mse: 0.5}",
         "loss.layer_map=[[0, 1], [1, 3]]")
    final = tmp_path / "w" / "final"
    proj = load_file(str(final / "projections.safetensors"))
    assert [tuple(proj[f"proj.{k}"].shape) for k in range(2)] == [(32, 16), (32, 16)]
    assert json.loads((final / "projections.json").read_text())["layer_map"] == [[0, 1], [1, 3]]


def test_a_bad_layer_map_is_one_line(tmp_path, teacher_dir, chat_file):
    with pytest.raises(UserError, match="layer_map pair \\[5, 0\\]"):
        _run(tmp_path, teacher_dir, chat_file, "bad", "loss.terms={ce: 0.5, hidden_mse: 0.5}",
             "loss.layer_map=[[5, 0]]")
    assert not (tmp_path / "bad").exists()


def test_unknown_term_names_the_closest():
    with pytest.raises(UserError, match="unknown term 'forward_kll'.*forward_kl"):
        load_config(None, ["loss.terms={forward_kll: 1.0}"])


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, tok):
    return save(make_model(tok, init_range=0.3, seed=7), tok, tmp_path_factory.mktemp("teacher2"))


def test_mixture_with_a_zero_weight_teacher_equals_one_teacher(tmp_path, teacher_dir, chat_file, second_teacher):
    _run(tmp_path, teacher_dir, chat_file, "one", "loss.alpha=0.8", FP32)
    _run(tmp_path, teacher_dir, chat_file, "mix", "loss.alpha=0.8", FP32,
         f"teacher.mix=[{{name: b, model: {second_teacher}, weight: 0.0}}]")
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "mix")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_mixture_of_two_teachers_differs_from_either(tmp_path, teacher_dir, chat_file, second_teacher):
    _run(tmp_path, teacher_dir, chat_file, "one", "loss.alpha=0.8")
    _run(tmp_path, teacher_dir, chat_file, "mix", "loss.alpha=0.8",
         f"teacher.mix=[{{name: b, model: {second_teacher}, weight: 1.0, offload: true}}]")
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "mix")
    assert any(not torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_routing_by_a_data_field(tmp_path, teacher_dir, second_teacher):
    data = tmp_path / "routed.jsonl"
    rows = [{"prompt": f"Say thing {i}.", "response": CORPUS[i % 6], "src": "a" if i % 2 else "b"}
            for i in range(30)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mix = f"teacher.mix=[{{name: b, model: {second_teacher}}}]"
    _run(tmp_path, teacher_dir, data, "routed", "teacher.name=a", mix, "teacher.route_field=src")
    assert (tmp_path / "routed" / "final" / "model.safetensors").exists()
    # routed only to the first teacher == that teacher alone (CE + KD on the same rows)
    only_a = tmp_path / "only_a.jsonl"
    only_a.write_text("".join(json.dumps({**r, "src": "a"}) + "\n" for r in rows))
    _run(tmp_path, teacher_dir, only_a, "ra", "teacher.name=a", mix, "teacher.route_field=src", FP32)
    _run(tmp_path, teacher_dir, only_a, "plain", FP32)
    a, b = _weights(tmp_path / "ra"), _weights(tmp_path / "plain")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**r, "src": "zed"}) + "\n" for r in rows))
    with pytest.raises(UserError, match="src='zed' names no teacher"):
        _run(tmp_path, teacher_dir, bad, "bad", "teacher.name=a", mix, "teacher.route_field=src")


def _resume_from(tmp_path, teacher_dir, chat_file, extra, ckpt):
    """A run "stopped" right after checkpoint `ckpt` of run `full` and resumed ends bit-identical."""
    import shutil
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / ckpt, tmp_path / "cut" / "checkpoints" / ckpt)
    cfg = load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "cut") + extra)
    distill(cfg, resume=True, progress=False)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rollout_masks_the_prompt_and_everything_after_eos(tok, teacher_dir):
    student = make_model(tok, layers=1, seed=3, init_range=0.5)
    eos = tok.eos_token_id
    # make EOS likely (about 1 in 6 per token) so some continuations stop early

    def more_eos(module, inputs, out):
        out[..., eos] += 4.0
        return out
    student.lm_head.register_forward_hook(more_eos)
    cfg = load_config(None, ["loss.on_policy=1.0", "loss.on_policy_tokens=12", "loss.on_policy_prompt_tokens=5"])
    ids = tok("The cat sat on the mat and looked at the moon.")["input_ids"]
    chat = Example([1, 2, 3, 4] + ids[:6], [IGNORE_INDEX] * 4 + ids[:6])
    text = Example(ids, list(ids))
    new = methods.rollout(student, [chat, text] * 3, cfg, tok.pad_token_id, eos, seed=1)
    assert len(new) == 6
    for e, src in zip(new, [chat, text] * 3):
        n_prompt = 4 if src is chat else 5
        assert e.input_ids[:n_prompt] == src.input_ids[:n_prompt]
        assert e.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt            # the prompt is never a target
        gen = e.input_ids[n_prompt:]
        assert e.labels[n_prompt:] == gen and 1 <= len(gen) <= 12          # targets: the continuation
        assert eos not in gen[:-1]                                         # nothing after the first EOS
    assert any(e.input_ids[-1] == eos for e in new)                        # some stopped early
    assert any(len(e.input_ids) == len(src.input_ids[:4 if src is chat else 5]) + 12
               for e, src in zip(new, [chat, text] * 3))                    # some ran the full budget
    # a pure function of the seed
    again = methods.rollout(student, [chat, text] * 3, cfg, tok.pad_token_id, eos, seed=1)
    assert [e.input_ids for e in again] == [e.input_ids for e in new]


def test_on_policy_run_logs_its_steps_and_resumes_exactly(tmp_path, teacher_dir, chat_file):
    extra = ["loss.on_policy=0.5", "loss.on_policy_tokens=6", "loss.divergence=jsd", "train.max_steps=6",
             "train.save_every=2"]
    _run(tmp_path, teacher_dir, chat_file, "full", *extra)
    rows = _log(tmp_path, "full")
    flags = [r["on_policy"] for r in rows]
    assert flags == [methods.on_policy_step(load_config(None, extra), s) for s in range(6)]
    assert True in flags and False in flags
    _resume_from(tmp_path, teacher_dir, chat_file, extra, "step_0000004")


def test_on_policy_rollouts_do_not_depend_on_the_split(tmp_path, teacher_dir, chat_file):
    """Issue 14, defect 5: rollouts were seeded by the micro-batch index local to each process, so
    two processes sampled what one process with grad_accum 2 did not (and all ranks shared seeds).
    Seeded by the global micro-batch index, both splits roll out the same and end with the same
    student."""
    from conftest import launch
    extra = ["loss.on_policy=1.0", "loss.on_policy_tokens=6", "loss.on_policy_temperature=1.0"]
    launch(2, "-m", "stillroom", "distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "two"), *extra,
           "--no-progress")
    _run(tmp_path, teacher_dir, chat_file, "one", *extra, "train.grad_accum=2")
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_on_policy_micro_batches_never_share_a_seed(tok):
    """The same examples in two global micro-batch slots sample two different continuations."""
    from types import SimpleNamespace
    student = make_model(tok, layers=1, seed=3, init_range=0.5)
    cfg = load_config(None, ["loss.on_policy=1.0", "loss.on_policy_tokens=8", "loss.on_policy_temperature=1.0"])
    ids = tok("The cat sat on the mat and looked at the moon.")["input_ids"]
    b = SimpleNamespace(examples=[Example(ids, list(ids))] * 4)
    out = methods.on_policy_batches(student, [b, b], cfg, tok.pad_token_id, tok.eos_token_id, [0, 1], "cpu")
    assert [e.input_ids for e in out[0].examples] != [e.input_ids for e in out[1].examples]


def test_on_policy_needs_a_live_teacher(tmp_path, teacher_dir, chat_file):
    with pytest.raises(UserError, match="on_policy"):
        _run(tmp_path, teacher_dir, chat_file, "x", "loss.on_policy=0.5", "teacher.kind=cache",
             f"teacher.cache={tmp_path}")


def test_balancing_brings_the_terms_to_their_weights(tmp_path, teacher_dir, chat_file):
    # a student cut from the teacher: its raw KD term starts ~5x smaller than CE
    _run(tmp_path, teacher_dir, chat_file, "bal", "loss.alpha=0.5",
         "loss.balance=true", "loss.balance_decay=0.5", "train.max_steps=8", "train.lr=1e-4")
    rows = _log(tmp_path, "bal")
    ce0, kd0 = rows[0]["terms"]["ce"], rows[0]["terms"]["forward_kl"]
    assert kd0 < ce0 / 3                        # unbalanced to begin with
    assert rows[0]["kd_scale"] == 1.0           # nothing is known before the first step
    for r in rows[2:]:
        ratio = r["kd_scale"] * r["terms"]["forward_kl"] / r["terms"]["ce"]   # alpha = 0.5: 1 is the goal
        assert 0.5 < ratio < 2.0, (r, ratio)


def test_balance_state_survives_resume(tmp_path, teacher_dir, chat_file):
    extra = ["loss.balance=true", "train.max_steps=4", "train.save_every=2"]
    _run(tmp_path, teacher_dir, chat_file, "full", *extra)
    _resume_from(tmp_path, teacher_dir, chat_file, extra, "step_0000002")


def test_hidden_terms_resume_exactly(tmp_path, teacher_dir, chat_file):
    """The projections and their optimizer state come back from the checkpoint: a resumed run ends
    with the uninterrupted run's student and projections, bit for bit."""
    extra = ["loss.terms={ce: 0.5, forward_kl: 0.3, hidden_cosine: 0.2}", "train.max_steps=4", "train.save_every=2"]
    _run(tmp_path, teacher_dir, chat_file, "full", *extra)
    _resume_from(tmp_path, teacher_dir, chat_file, extra, "step_0000002")
    a, b = (load_file(str(tmp_path / r / "final" / "projections.safetensors")) for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("wrapper", ["loss.balance=true", "loss.on_policy=0.5"])
def test_wrapped_objectives_still_train_their_projections(tmp_path, teacher_dir, chat_file, wrapper):
    """Balancing and on-policy wrap the hidden-state objective: its projections still train
    (a wrapper once read the base class's empty `trained` and left them out)."""
    _run(tmp_path, teacher_dir, chat_file, "w", "loss.terms={ce: 0.5, forward_kl: 0.3, hidden_cosine: 0.2}",
         wrapper, "train.lr=1e-2")
    proj = load_file(str(tmp_path / "w" / "final" / "projections.safetensors"))
    assert not torch.equal(proj["proj.0"], torch.eye(32)) and not torch.equal(proj["proj.1"], torch.eye(32))


def test_token_weights_run_and_change_the_result(tmp_path, teacher_dir, chat_file):
    _run(tmp_path, teacher_dir, chat_file, "none", "loss.alpha=1.0")
    _run(tmp_path, teacher_dir, chat_file, "conf", "loss.alpha=1.0", "loss.token_weight=confidence")
    rows = _log(tmp_path, "conf")
    assert rows[-1]["terms"]["forward_kl"] >= 0
    a, b = _weights(tmp_path / "none"), _weights(tmp_path / "conf")
    assert any(not torch.allclose(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def other_tok_teacher(tmp_path_factory):
    """A teacher with its own tokenizer (another BPE vocabulary over the same corpus)."""
    tok2 = make_tokenizer(vocab_size=400)
    return save(make_model(tok2, init_range=0.3, seed=5, hidden=48, heads=4, kv=2),
                tok2, tmp_path_factory.mktemp("teacher_tok2"))


def test_alignment_pairs_positions_that_read_the_same_text(tok, other_tok_teacher):
    from transformers import AutoTokenizer
    t_tok = AutoTokenizer.from_pretrained(other_tok_teacher)
    ids = tok("The cat sat on the mat and looked at the moon. Rain falls, rivers run.")["input_ids"]
    e = Example(ids, list(ids))
    labels = torch.tensor([ids[1:] + [IGNORE_INDEX]])
    al = methods.align([e], labels, tok, t_tok, "cpu")
    assert al.s_rows.numel() >= len(ids) // 2          # most word boundaries are shared
    t_ids = al.input_ids[0].tolist()
    for s, t in zip(al.s_rows.tolist(), al.t_rows.tolist()):
        assert tok.decode(ids[:s + 1]) == t_tok.decode(t_ids[:t + 1], skip_special_tokens=True)
    s_ids, t_ids2 = methods.vocab_match(tok, t_tok)
    assert len(s_ids) > 100
    for a, b in list(zip(s_ids.tolist(), t_ids2.tolist()))[:50]:
        assert tok.decode([a]) == t_tok.decode([b])


MIXED_TEXT = "Café crème, naïve — 東京で寿司を食べた 🍣🎉 and the cat sat on the mat. Ünïcödé ok 👍🏽."


def test_alignment_never_pairs_positions_inside_a_character(tok, other_tok_teacher):
    """Issue 14, defect 4: a byte-level BPE splits a CJK character or an emoji into several tokens
    that all carry the character's end offset; positions inside a character must not be aligned
    (their prefix is not text yet), on either side. Positions right after a whole multi-byte
    character still are."""
    from transformers import AutoTokenizer
    t_tok = AutoTokenizer.from_pretrained(other_tok_teacher)
    ids = tok(MIXED_TEXT)["input_ids"]
    assert tok.decode(ids) == MIXED_TEXT and len(ids) > len(MIXED_TEXT.encode()) // 2
    ends = methods.char_ends(tok, ids, MIXED_TEXT)
    for i, end in enumerate(ends):   # -1 exactly where the prefix is not a whole-character prefix
        pre = tok.decode(ids[:i + 1])
        assert (end == -1) == ("\ufffd" in pre), (i, pre, end)
        if end != -1:
            assert pre == MIXED_TEXT[:end]
    labels = torch.tensor([ids[1:] + [IGNORE_INDEX]])
    al = methods.align([Example(ids, list(ids))], labels, tok, t_tok, "cpu")
    t_ids = al.input_ids[0].tolist()
    after_wide = 0
    for s, t in zip(al.s_rows.tolist(), al.t_rows.tolist()):
        pre = tok.decode(ids[:s + 1])
        assert "\ufffd" not in pre and MIXED_TEXT.startswith(pre), pre
        assert t_tok.decode(t_ids[:t + 1], skip_special_tokens=True) == pre
        after_wide += len(pre[-1].encode()) > 1
    assert after_wide >= 5   # e.g. after 東, 京, 🍣: those positions are still aligned


def _word_tokenizer(vocab: dict, decoder):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


def test_vocab_match_keeps_word_initial_spaces_and_whole_vocabulary_keys(tmp_path, monkeypatch):
    """Issue 14, defect 6: a SentencePiece decoder strips the leading space of a lone piece, so
    '▁the' read as 'the' and collided with the bare subword 'the' (dropped or mis-paired); and the
    on-disk match was keyed on 50 entries plus sizes, so a same-size tokenizer reused a stale match."""
    from tokenizers import decoders
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path))
    student = _word_tokenizer({"<unk>": 0, "Ġthe": 1, "the": 2, "Ġcat": 3, "cat": 4, "a": 5}, decoders.ByteLevel())
    spm = {"<unk>": 0, "▁the": 1, "the": 2, "▁cat": 3, "cat": 4, "a": 5, "▁": 6}
    teacher = _word_tokenizer(spm, decoders.Metaspace())
    pairs = dict(zip(*(x.tolist() for x in methods.vocab_match(student, teacher))))
    assert pairs == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}           # ' the' <-> ' the', 'the' <-> 'the', ...
    # a tokenizer of the same size whose first entries agree: its own match, not the cached one
    other = _word_tokenizer({**{k: v for k, v in spm.items() if k != "cat"}, "dog": 4}, decoders.Metaspace())
    assert len(other) == len(teacher)
    pairs = dict(zip(*(x.tolist() for x in methods.vocab_match(student, other))))
    assert pairs == {1: 1, 2: 2, 3: 3, 5: 5}
    assert len(list((tmp_path / "vocab-match").glob("*.pt"))) == 2


def test_cross_tokenizer_distillation_runs(tmp_path, teacher_dir, other_tok_teacher, chat_file):
    with pytest.raises(UserError, match="cross_tokenizer=uld"):
        _run(tmp_path, other_tok_teacher, chat_file, "refused", f"student.model={teacher_dir}")
    _, m = _run(tmp_path, other_tok_teacher, chat_file, "x", f"student.model={teacher_dir}",
                "loss.cross_tokenizer=uld", "loss.alpha=0.5", "train.max_steps=4")
    rows = _log(tmp_path, "x")
    assert all(r["terms"]["uld"] > 0 for r in rows)
    final = tmp_path / "x" / "final"
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(final).get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    assert m["eval"]["student after"]["perplexity"] > 0 and m["eval"]["student after"]["agreement"] is None
    # bits per byte: the teacher (another tokenizer) and the student on the same held-out text
    assert m["eval"]["teacher"]["bits_per_byte"] > 0 and m["eval"]["student after"]["bits_per_byte"] > 0
    assert "bits per byte" in m["table"]


def test_two_stages_in_one_command(tmp_path, teacher_dir, chat_file, text_file):
    _, m = _run(tmp_path, teacher_dir, chat_file, "two", f"finetune.data={text_file}", "finetune.max_steps=2")
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()
    assert (tmp_path / "two" / "finetune" / "final" / "model.safetensors").exists()
    assert "stage 2" in m["table"]
    a, b = _weights(tmp_path / "two"), load_file(str(tmp_path / "two" / "finetune" / "final" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="finetune.data not found"):
        _run(tmp_path, teacher_dir, chat_file, "nf", f"finetune.data={tmp_path}/missing.txt")
    assert not (tmp_path / "nf").exists()


def test_a_cached_teacher_in_the_mix_equals_it_live(tmp_path, teacher_dir, chat_file, second_teacher):
    from stillroom.models import core as m
    from conftest import make_cache
    V = m.logits_width(m.load(str(second_teacher)).model)
    make_cache(second_teacher, chat_file, tmp_path / "c2", f"cache.top_k={V}", "cache.dtype=float32",
               "loss.temperature=1.0")
    _run(tmp_path, teacher_dir, chat_file, "live", FP32,   # the cache was written by the fp32 teacher
         f"teacher.mix=[{{name: b, model: {second_teacher}, dtype: float32}}]")
    _run(tmp_path, teacher_dir, chat_file, "cached", FP32,
         f"teacher.mix=[{{name: b, kind: cache, cache: {tmp_path / 'c2'}}}]")
    a, b = _weights(tmp_path / "live"), _weights(tmp_path / "cached")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_logged_terms_sum_over_micro_batches(tmp_path, teacher_dir, other_tok_teacher, chat_file):
    """Each term's logged size covers the whole step, however it is split into micro-batches."""
    base = [f"student.model={teacher_dir}", "loss.cross_tokenizer=uld", "loss.alpha=0.5", "train.max_steps=1"]
    _run(tmp_path, other_tok_teacher, chat_file, "one", *base, **{"train.batch_size": 4})
    _run(tmp_path, other_tok_teacher, chat_file, "two", *base, "train.grad_accum=2", **{"train.batch_size": 2})
    a, b = _log(tmp_path, "one")[0]["terms"], _log(tmp_path, "two")[0]["terms"]
    assert a.keys() == b.keys() == {"ce", "uld"}
    assert all(a[k] == pytest.approx(b[k], rel=1e-4) for k in a), (a, b)
