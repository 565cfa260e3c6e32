"""Loss identities and reference formulas."""
import math

import pytest
import torch

from stillroom.eval.evaluate import token_stats
from stillroom.losses import (IGNORE_INDEX, cross_entropy, distill_loss, forward_kl, hard_label_ce, hybrid,
                              shift_labels)
from stillroom.losses.kernel import mixed_loss

from conftest import logits, ref_forward_kl

# every test here builds its tensors on the device the suite targets (conftest: STILLROOM_TEST_DEVICE)
pytestmark = pytest.mark.usefixtures("on_device")


def test_kl_of_identical_distributions_is_zero():
    s = logits(2, 5, 11)
    loss = forward_kl(s, s.detach().clone(), temperature=2.0)
    assert abs(loss.item()) < 1e-5
    loss.backward()
    assert s.grad.abs().max() < 1e-6


def test_forward_kl_matches_hand_computed_two_token_case():
    # p = (0.75, 0.25), q = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    s = torch.zeros(1, 1, 2, requires_grad=True)
    t = torch.tensor([[[math.log(3.0), 0.0]]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert forward_kl(s, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_forward_kl_matches_reference_and_its_gradient(T):
    s, t = logits(3, 7, 13, seed=1), logits(3, 7, 13, seed=2).detach()
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    ours = forward_kl(s, t, mask, temperature=T)
    (g_ours,) = torch.autograd.grad(ours, s)
    s2 = s.detach().clone().requires_grad_(True)
    ref = ref_forward_kl(s2, t, mask, T)
    (g_ref,) = torch.autograd.grad(ref, s2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_ours, g_ref.float(), rtol=1e-4, atol=1e-6)


def test_temperature_squared_scaling():
    # T^2 * KL(p_T || q_T): with logits scaled by T the tempered distributions equal the T=1 ones,
    # so the loss is exactly T^2 times the T=1 loss.
    s, t = logits(2, 4, 9, seed=4), logits(2, 4, 9, seed=5).detach()
    base = forward_kl(s, t, temperature=1.0)
    for T in (2.0, 3.0):
        scaled = forward_kl(s * T, t * T, temperature=T)
        assert scaled.item() == pytest.approx(T * T * base.item(), rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_chunked_equals_unchunked(chunk):
    s, t = logits(4, 6, 17, seed=6), logits(4, 6, 17, seed=7).detach()
    labels = torch.randint(0, 17, (4, 6), generator=torch.Generator().manual_seed(8))
    labels[0, :3] = IGNORE_INDEX
    for kind in ("soft", "hard"):
        whole = distill_loss(s, t, labels, hybrid(0.7, kind), 2.0, chunk=10_000)
        (g_whole,) = torch.autograd.grad(whole, s)
        part = distill_loss(s, t, labels, hybrid(0.7, kind), 2.0, chunk=chunk)
        (g_part,) = torch.autograd.grad(part, s)
        assert part.item() == pytest.approx(whole.item(), rel=1e-6)
        torch.testing.assert_close(g_part, g_whole, rtol=1e-6, atol=1e-7)


def test_all_masked_batch_is_zero_with_valid_gradient():
    s, t = logits(2, 3, 5, seed=9), logits(2, 3, 5, seed=10).detach()
    labels = torch.full((2, 3), IGNORE_INDEX)
    for kind in ("soft", "hard"):
        loss = distill_loss(s, t, labels, hybrid(0.5, kind), 2.0)
        (g,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0
        assert torch.isfinite(g).all() and (g == 0).all()
    loss = forward_kl(s, t, torch.zeros(2, 3, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and (g == 0).all()


def test_minus_inf_logits_are_masked_not_nan():
    s = torch.tensor([[[0.0, 1.0, -math.inf, 2.0]]], requires_grad=True)
    t = torch.tensor([[[1.0, -math.inf, -math.inf, 0.5]]])
    loss = forward_kl(s, t, temperature=1.5)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # Reference: the student renormalized on the teacher's support (tokens 0 and 3), 0 log 0 = 0.
    keep = [0, 3]
    log_q = torch.log_softmax(s.detach()[0, 0, keep] / 1.5, -1)
    log_p = torch.log_softmax(t[0, 0, keep] / 1.5, -1)
    expected = 1.5 ** 2 * (log_p.exp() * (log_p - log_q)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _masked_teacher(seed=31, V=9):
    """Student logits, a teacher that masks a few tokens per row (-inf), labels, and the reference
    rule: KL(p || q renormalized on p's support), in float64 with plain autograd."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 4, V, generator=g) * 2
    t = torch.randn(2, 4, V, generator=g) * 2
    t[0, 1, :3] = -math.inf
    t[1, 2, 4:7] = -math.inf
    t[1, 3, 0] = -math.inf
    y = torch.randint(0, V, (2, 4), generator=g)
    y[0, 0] = IGNORE_INDEX
    return s, t, y


def _support_ref(s, t, keep, T):
    inside = torch.isfinite(t)
    lq = torch.log_softmax(torch.where(inside, s.double(), -math.inf) / T, -1)
    lp = torch.log_softmax(t.double() / T, -1)
    rows = torch.where(inside, lp.exp() * (lp - torch.where(inside, lq, 0.0)), 0.0).sum(-1)
    return T * T * (rows * keep).sum()


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_masked_teacher_tokens_follow_one_rule_on_every_path(T):
    """Issue 14, defect 7: -inf teacher logits renormalize the student on the teacher's support on
    every path: fast forward_kl, jsd(beta=0), the general path, the hybrid with CE (T = 1 fuses the
    CE gradient into the KD one), the lean path, and the evaluation's KL (was 4.285 vs 2.157)."""
    from stillroom.losses import jsd
    from stillroom.losses.general import general_loss
    from stillroom.losses.kernel import linear_mixed_loss
    s, t, y = _masked_teacher()
    keep = y != IGNORE_INDEX

    def grad(fn):
        x = s.clone().requires_grad_(True)
        v = fn(x)
        return v.detach(), torch.autograd.grad(v, x)[0]

    want, g_want = grad(lambda x: _support_ref(x, t, keep, T))
    paths = {
        "forward_kl": lambda x: forward_kl(x, t, keep, temperature=T, chunk=3),
        "jsd(0)": lambda x: jsd(x, t, keep, beta=0.0, temperature=T, chunk=3),
        "general": lambda x: general_loss(x, [(t, 1.0)], y, {"forward_kl": 1.0}, temperature=T, chunk=3),
    }
    for name, fn in paths.items():
        v, g = grad(fn)
        assert v.item() == pytest.approx(want.item(), rel=1e-5), name
        torch.testing.assert_close(g, g_want.float(), rtol=1e-4, atol=1e-6, msg=name)
    # the hybrid (CE on the same rows), plain and lean, against the reference + plain CE
    ce = lambda x: torch.nn.functional.cross_entropy(x[keep].double(), y[keep], reduction="sum")  # noqa: E731
    want_h, g_h = grad(lambda x: 0.7 * _support_ref(x, t, keep, T) + 0.3 * ce(x))
    v, g = grad(lambda x: mixed_loss(x, [(t, 0.7)], y, ce_weight=0.3, temperature=T, chunk=3))
    assert v.item() == pytest.approx(want_h.item(), rel=1e-5)
    torch.testing.assert_close(g, g_h.float(), rtol=1e-4, atol=1e-6)
    eye = torch.eye(s.shape[-1])   # hidden = logits, head = identity: the lean path on the same logits
    v, g = grad(lambda x: linear_mixed_loss(x, eye, [(t, 0.7)], y, ce_weight=0.3, temperature=T, chunk=3))
    assert v.item() == pytest.approx(want_h.item(), rel=1e-5)
    torch.testing.assert_close(g, g_h.float(), rtol=1e-4, atol=1e-6)
    if T == 1.0:
        assert token_stats(s, t, y)["kl"] == pytest.approx(want.item(), rel=1e-5)


def test_hard_label_targets_are_teacher_argmax():
    s, t = logits(2, 5, 8, seed=11), logits(2, 5, 8, seed=12).detach()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    target = t.argmax(-1)
    ref = torch.nn.functional.cross_entropy(s[mask], target[mask], reduction="sum")
    assert hard_label_ce(s, t, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    # Equivalent to CE on labels = teacher argmax:
    labels = torch.where(mask, target, IGNORE_INDEX)
    assert cross_entropy(s, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def test_hybrid_is_alpha_kd_plus_one_minus_alpha_ce():
    s, t = logits(2, 6, 10, seed=13), logits(2, 6, 10, seed=14).detach()
    labels = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(15))
    labels[1, 0] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    for alpha in (0.0, 0.3, 1.0):
        soft = distill_loss(s, t, labels, hybrid(alpha, "soft"), 2.0)
        ref = alpha * ref_forward_kl(s, t, mask, 2.0) + (1 - alpha) * torch.nn.functional.cross_entropy(
            s[mask], labels[mask], reduction="sum")
        assert soft.item() == pytest.approx(ref.item(), rel=1e-5)
        hard = distill_loss(s, t, labels, hybrid(alpha, "hard"))
        ref_h = alpha * hard_label_ce(s, t, mask) + (1 - alpha) * cross_entropy(s, labels)
        assert hard.item() == pytest.approx(ref_h.item(), rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])   # T = 1 folds the CE gradient into the KD one
def test_hybrid_gradient_matches_autograd_reference(T):
    s, t = logits(3, 5, 11, seed=21), logits(3, 5, 11, seed=22).detach()
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(23))
    labels[0, :2] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    s2 = s.detach().clone().requires_grad_(True)
    ours = distill_loss(s, t, labels, hybrid(0.7), T)
    ref = 0.7 * ref_forward_kl(s2, t, mask, T) + 0.3 * torch.nn.functional.cross_entropy(
        s2[mask], labels[mask], reduction="sum")
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, s), torch.autograd.grad(ref, s2)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)
    # two teachers, both folded the same way
    two = mixed_loss(s, [(t, 0.4), (t.flip(0), 0.3)], labels, 0.3, T)
    ref2 = (0.4 * ref_forward_kl(s2, t, mask, T) + 0.3 * ref_forward_kl(s2, t.flip(0), mask, T)
            + 0.3 * torch.nn.functional.cross_entropy(s2[mask], labels[mask], reduction="sum"))
    (g2,), (g2_ref,) = torch.autograd.grad(two, s), torch.autograd.grad(ref2, s2)
    torch.testing.assert_close(g2, g2_ref, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient():
    s, t = logits(1, 4, 6, seed=16), logits(1, 4, 6, seed=17)
    loss = forward_kl(s, t, temperature=2.0)
    loss.backward()
    assert t.grad is None and s.grad is not None


def test_sliced_vocab_views_work_without_copies():
    s, t = logits(2, 3, 12, seed=18), logits(2, 3, 10, seed=19).detach()
    a = forward_kl(s[..., :10], t)
    b = ref_forward_kl(s[..., :10], t, torch.ones(2, 3), 1.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    (g,) = torch.autograd.grad(a, s)
    assert (g[..., 10:] == 0).all()


def test_bad_arguments_are_rejected():
    s, t = logits(1, 2, 3), logits(1, 2, 3).detach()
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(s, t, torch.zeros(1, 2, dtype=torch.long), hybrid(1.5))
    with pytest.raises(ValueError, match="differ"):
        forward_kl(s, logits(1, 2, 4).detach())


def test_shift_labels_and_token_stats():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert shift_labels(labels).tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    s, t = logits(1, 4, 9, seed=20).detach(), logits(1, 4, 9, seed=21).detach()
    y = torch.tensor([[1, 2, IGNORE_INDEX, 3]])
    st = token_stats(s, t, y)
    mask = y != IGNORE_INDEX
    assert st["tokens"] == 3
    assert st["kl"] == pytest.approx(ref_forward_kl(s, t, mask, 1.0).item(), rel=1e-5)
    nll = torch.nn.functional.cross_entropy(s[mask], y[mask], reduction="sum").item()
    assert st["student_nll"] == pytest.approx(nll, rel=1e-6)
    assert st["agree"] == int((s.argmax(-1) == t.argmax(-1))[mask].sum())


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_inplace_gradient_matches_and_reuses_the_logits(kind):
    base = logits(3, 5, 11, seed=22)
    t = logits(3, 5, 11, seed=23).detach()
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(24))
    labels[2, 1:] = IGNORE_INDEX
    ref = distill_loss(base * 1.0, t, labels, hybrid(0.4, kind), 2.0)
    (g_ref,) = torch.autograd.grad(ref * 3.0, base)
    x = base * 1.0  # the "logits" produced by a model: a non-leaf tensor
    loss = distill_loss(x, t, labels, hybrid(0.4, kind), 2.0, inplace_grad=True)
    (g,) = torch.autograd.grad(loss * 3.0, base)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g, g_ref)
    # the logits' storage now holds the (scaled) gradient: no second full-size buffer was made
    torch.testing.assert_close(x.detach(), g_ref)
