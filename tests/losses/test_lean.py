"""The lean path (logits made inside the loss from hidden states, chunk by chunk, only at labelled
positions) equals the plain path on materialized logits: loss and every gradient."""
import pytest
import torch

from stillroom.losses import IGNORE_INDEX, Head, distill_loss, hybrid, topk_targets
from stillroom.losses.kernel import linear_mixed_loss, mixed_loss

# every test here builds its tensors on the device the suite targets (conftest: STILLROOM_TEST_DEVICE)
pytestmark = pytest.mark.usefixtures("on_device")

B, S, H, HT, V = 2, 7, 12, 10, 33


def setup(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, H, generator=g, dtype=torch.float32, requires_grad=True)
    w = (torch.randn(V, H, generator=g, dtype=torch.float32) * 0.7).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=torch.float32) * 0.3).requires_grad_(True) if bias else None
    ht = torch.randn(B, S, HT, generator=g, dtype=torch.float32)
    wt = torch.randn(V, HT, generator=g, dtype=torch.float32) * 0.7
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :3] = IGNORE_INDEX    # a prompt
    labels[1, -2:] = IGNORE_INDEX   # padding
    return h, w, b, ht, wt, labels


def grads(loss, *xs):
    return torch.autograd.grad(loss, [x for x in xs if x is not None])


def plain_logits(h, w, b):
    return torch.nn.functional.linear(h, w, b)


@pytest.mark.parametrize("kind,T,alpha,bias,target,chunk", [
    ("soft", 1.0, 0.5, False, "head", 4),
    ("soft", 2.0, 0.9, True, "head", 3),
    ("soft", 2.0, 1.0, False, "logits", 64),
    ("soft", 1.0, 0.7, False, "topk", 5),
    ("hard", 1.0, 0.5, True, "head", 2),
    ("soft", 1.0, 0.0, False, "head", 4),   # CE alone
])
def test_lean_equals_plain(kind, T, alpha, bias, target, chunk):
    h, w, b, ht, wt, labels = setup(bias=bias)
    t_logits = ht @ wt.T
    plain_t = {"head": t_logits, "logits": t_logits, "topk": topk_targets(t_logits, 6, T)}[target]
    lean_t = {"head": Head(ht, wt), "logits": t_logits, "topk": plain_t}[target]
    ref = mixed_loss(plain_logits(h, w, b), [(plain_t, alpha)], labels, 1 - alpha, T, kind)
    got = distill_loss(Head(h, w, b), lean_t, labels, hybrid(alpha, kind), T, chunk=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # fp32 inside the losses
    for g_got, g_ref in zip(grads(got, h, w, b), grads(ref, h, w, b)):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_lean_several_targets_and_fp32():
    """Two weighted teachers, float32 (the training dtype): within fp32 tolerance of the plain path."""
    h, w, _, ht, wt, labels = setup(1)
    h, w = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ht, wt = ht.float(), wt.float()
    t2 = (ht.flip(1) @ wt.T) * 0.5
    ref = mixed_loss(h @ w.T, [(ht @ wt.T, 0.3), (t2, 0.4)], labels, 0.3, 1.5)
    got = linear_mixed_loss(h, w, [(Head(ht, wt), 0.3), (t2, 0.4)], labels, 0.3, 1.5, chunk=3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g_got, g_ref in zip(grads(got, h, w), grads(ref, h, w)):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_lean_in_bf16_is_the_plain_path_under_autocast():
    """dtype=bf16 (mixed precision): the head's matmuls in bf16, as bf16 autocast runs the model's own
    head on the plain path; the loss is that path's exactly, the hidden states' gradient too, and the
    head's gradients are within bf16 rounding of autograd's (autograd rounds the whole product to
    bf16, the lean path each chunk's product, summed in fp32). In fp32 the same loss is measurably
    different."""
    h, w, b, ht, wt, labels = setup(2, bias=True)
    t = ht @ wt.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = torch.nn.functional.linear(h, w, b)
    ref = mixed_loss(s, [(t, 0.6)], labels, 0.4, 1.0)
    got = linear_mixed_loss(h, w, [(t, 0.6)], labels, 0.4, 1.0, chunk=3, bias=b, dtype=torch.bfloat16)
    f32 = linear_mixed_loss(h, w, [(t, 0.6)], labels, 0.4, 1.0, chunk=3, bias=b)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert abs(f32.item() - ref.item()) > 1e-4
    g_got, g_ref = grads(got, h, w, b), grads(ref, h, w, b)
    assert all(g.dtype == torch.float32 for g in g_got)
    torch.testing.assert_close(g_got[0], g_ref[0], rtol=1e-6, atol=1e-6)
    for x, y in zip(g_got[1:], g_ref[1:]):
        torch.testing.assert_close(x, y, rtol=2 ** -8, atol=2 ** -8 * y.abs().max().item())


def test_the_lean_head_is_found_under_bf16_mixed_precision(tok, tmp_path):
    """Accelerate runs a bf16 student's forward under autocast: the check that the logits are a
    plain linear head of the hidden states must still pass (it did not, and the lean path fell back
    to the plain one without a word)."""
    from conftest import make_model

    from stillroom.recipes import load_config
    from stillroom.models import running
    from stillroom.run.tracking import make_accelerator
    acc = make_accelerator(load_config(None, ["train.mixed_precision=bf16"]), tmp_path, threads=False)
    model = acc.prepare(make_model(tok, layers=1))
    ids = torch.arange(1, 9)[None]
    assert model(input_ids=ids).logits.dtype == torch.float32    # Accelerate's outputs come back in fp32 ...
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=ids).logits, model._original_forward(input_ids=ids).logits.float())
    assert running.output_head(model) is not None                  # ... from a bf16 head: still a linear head


def test_lean_skips_unlabelled_positions():
    """Positions without a label cost nothing and get no gradient, whatever their hidden state."""
    h, w, _, ht, wt, labels = setup(2)
    with torch.no_grad():
        h[labels == IGNORE_INDEX] = float("nan")   # never read
    got = distill_loss(Head(h, w), Head(ht, wt), labels, hybrid(0.5), 1.0)
    assert torch.isfinite(got)
    (gh,) = grads(got, h)
    assert (gh[labels == IGNORE_INDEX] == 0).all() and (gh[labels != IGNORE_INDEX] != 0).any()


def test_lean_all_masked_is_zero_not_nan():
    h, w, _, ht, wt, labels = setup(3)
    labels[:] = IGNORE_INDEX
    got = distill_loss(Head(h, w), Head(ht, wt), labels, hybrid(0.5), 1.0)
    assert got.item() == 0.0
    gh, gw = grads(got, h, w)
    assert (gh == 0).all() and (gw == 0).all()


def test_lean_refuses_mismatched_vocab():
    h, w, _, ht, wt, labels = setup(4)
    with pytest.raises(ValueError, match="align vocabularies"):
        distill_loss(Head(h, w), Head(ht, wt[:-1]), labels, hybrid(0.5))


def test_lean_tied_weight_through_a_model():
    """A tiny tied-embedding Llama: hidden states from the base model + the lean loss give the
    same parameter gradients as the model's full logits + the plain loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg)
    ids = torch.randint(0, V, (B, S))
    labels = torch.randint(0, V, (B, S))
    labels[:, :2] = IGNORE_INDEX
    t = torch.randn(B, S, V)
    ref = mixed_loss(m(input_ids=ids).logits, [(t, 0.6)], labels, 0.4, 2.0)
    ref_g = torch.autograd.grad(ref, list(m.parameters()))
    hidden = m.model(input_ids=ids).last_hidden_state
    got = distill_loss(Head(hidden, m.lm_head.weight), t, labels, hybrid(0.6), 2.0, chunk=5)
    got_g = torch.autograd.grad(got, list(m.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_lean_head_runs_in_autocasts_dtype_whatever_the_shared_state_says(teacher_dir, chat_file, monkeypatch):
    """Accelerate keeps one process-wide state: a second Accelerator in the process (an fp32 trainer
    beside a bf16 run, as in bench/peers.py) resets it, while the first one's autocast still runs
    bf16. The lean head follows autocast, not the state (it read the state: a bf16 run's head
    matmuls ran in fp32, 1.3x slower, found in the bench)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import stillroom.losses.front as front
    from ddp_grads import step_grads

    acc = Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state()
    Accelerator(cpu=True, mixed_precision="no")   # the other trainer
    assert acc.mixed_precision == "no"
    seen, real = [], front.linear_mixed_loss
    monkeypatch.setattr(front, "linear_mixed_loss", lambda *a, **k: (seen.append(k["dtype"]), real(*a, **k))[1])
    step_grads(str(teacher_dir), str(chat_file), 1, acc)
    assert seen and set(seen) == {torch.bfloat16}


def test_the_automatic_chunk_is_thicker_on_cuda():
    """auto_chunk_rows: the CPU's chunk (sized to the caches) as before; on CUDA eight times the rows
    (launch-bound thin chunks); powers of two, capped. A device type is all it reads (no GPU needed)."""
    from stillroom.losses import auto_chunk_rows
    assert [auto_chunk_rows(v) for v in (49152, 262144, 32)] == [128, 32, 1024]
    assert [auto_chunk_rows(v, "cpu") for v in (49152, 262144)] == [128, 32]
    assert [auto_chunk_rows(v, torch.device("cuda")) for v in (49152, 262144, 32)] == [1024, 256, 4096]
