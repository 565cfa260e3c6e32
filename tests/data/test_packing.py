"""Packing: several documents in one row, no attention or targets across their boundaries."""
import torch
from accelerate import Accelerator

from stillroom.config import Config
from stillroom.data.examples import Example, collate, model_inputs, pack_documents, pack_examples
from stillroom.data.store import load_data
from stillroom.losses import IGNORE_INDEX
from stillroom.models import core as models
from stillroom.run.distill import accumulate
from stillroom.data.examples import to_batch

from conftest import make_model


def test_pack_examples_keeps_every_example_once_and_fills_rows():
    ex = [Example(list(range(100 + i, 100 + i + n)), [IGNORE_INDEX] * 2 + list(range(n - 2)))
          for i, n in enumerate([30, 5, 17, 40, 8, 3, 22, 31, 12, 9])]
    rows = pack_examples(ex, 48)
    assert len(rows) < len(ex)
    seen = []
    for r in rows:
        assert len(r.input_ids) <= 48 and len(r.input_ids) == len(r.labels)
        segs = r.segments or (len(r.input_ids),)
        assert sum(segs) == len(r.input_ids)
        at = 0
        for n in segs:
            seen.append(tuple(r.input_ids[at:at + n]))
            assert r.labels[at] == IGNORE_INDEX       # a document's first token is never a target
            at += n
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in ex)
    assert sum(len(e.input_ids) for e in ex) / (48 * len(rows)) > 0.85   # little padding left


def test_pack_documents_cuts_blocks_and_keeps_boundaries():
    docs = [[1] * 10, [2] * 25, [3] * 4, [4] * 30]
    rows = pack_documents(docs, 16)
    assert [len(r.input_ids) for r in rows] == [16, 16, 16, 16, 5]
    assert rows[0].segments == (10, 6) and rows[1].segments is None and rows[2].segments == (3, 4, 9)
    assert sum((r.input_ids for r in rows), []) == sum(docs, [])


def test_packed_documents_do_not_see_each_other(tok):
    """Logits of each document inside a packed row equal its logits alone (sdpa and eager)."""
    for impl in ("sdpa", "eager"):
        m = make_model(tok, layers=2)
        m.config._attn_implementation = impl
        m.eval()
        a, b = list(range(5, 17)), list(range(40, 49))
        row = collate([Example(a + b, a + b, (len(a), len(b))), Example(b, b)], tok.pad_token_id)
        with torch.no_grad():
            packed = m(**model_inputs(row), use_cache=False).logits   # a cache turns packing off
            alone_a = m(input_ids=torch.tensor([a])).logits
            alone_b = m(input_ids=torch.tensor([b])).logits
        torch.testing.assert_close(packed[0, :len(a)], alone_a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(packed[0, len(a):], alone_b[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(packed[1, :len(b)], alone_b[0], rtol=1e-4, atol=1e-5)


def test_a_packed_step_equals_the_unpacked_step(teacher_dir, chat_file):
    """The same examples in one optimizer step, packed (data.pack) or one per padded row: the same
    loss and gradients (lean and plain paths), so packing changes nothing but the padding."""
    teacher = models.load(str(teacher_dir))
    acc = Accelerator(cpu=True)
    for lean in (True, False):
        grads, losses = [], []
        for pack in (False, True):
            cfg = Config.model_validate({
                "teacher": {"model": str(teacher_dir)}, "student": {"num_layers": 2},
                "data": {"path": str(chat_file), "seq_len": 128, "eval_fraction": 0.0, "pack": pack},
                "loss": {"alpha": 0.6, "temperature": 2.0, "lean": lean}})
            student, _ = models.student_from_teacher(teacher.model, num_layers=2)
            train, _ = load_data(cfg, teacher.tokenizer)
            if not pack:
                n_unpacked = len(train)
            else:
                assert any(e.segments for e in train) and len(train) < n_unpacked
            stats = accumulate(student, teacher.model, [to_batch(train, teacher.tokenizer.pad_token_id, "cpu")],
                               cfg, acc)
            losses.append(stats["loss"])
            grads.append({n: p.grad for n, p in student.named_parameters()})
        assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
        for k in grads[0]:
            torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)
