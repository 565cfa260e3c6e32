"""The other divergences: identities at their limits, references written out by hand, gradients
against autograd, chunked == whole, and the same through the lean path."""
import pytest
import torch

from stillroom.losses import (IGNORE_INDEX, DIVERGENCES, Head, distill_loss, divergence, forward_kl, hybrid, jsd,
                              reverse_kl, skew_kl, skew_reverse_kl, topk_targets, total_variation)
from stillroom.losses.kernel import mixed_loss

# every test here builds its tensors on the device the suite targets (conftest: STILLROOM_TEST_DEVICE)
pytestmark = pytest.mark.usefixtures("on_device")


def logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).requires_grad_(True)


def setup(seed=0):
    s, t = logits(2, 5, 9, seed=seed), logits(2, 5, 9, seed=seed + 1).detach()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return s, t, mask


def ref(name, s, t, mask, T, beta):
    """Textbook formulas in float64 with plain autograd."""
    q = torch.softmax(s.double() / T, -1)
    p = torch.softmax(t.double() / T, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    rows = {
        "forward_kl": lambda: kl(p, q),
        "reverse_kl": lambda: kl(q, p),
        "jsd": lambda: beta * kl(p, beta * p + (1 - beta) * q) + (1 - beta) * kl(q, beta * p + (1 - beta) * q),
        "skew_kl": lambda: kl(p, beta * p + (1 - beta) * q),
        "skew_rkl": lambda: kl(q, beta * q + (1 - beta) * p),
        "tv": lambda: 0.5 * (p - q).abs().sum(-1),
    }[name]()
    return (T * T * rows * mask).sum()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("T,beta", [(1.0, 0.5), (2.0, 0.1), (0.7, 0.9)])
def test_divergence_matches_reference_value_and_gradient(name, T, beta):
    s, t, mask = setup()
    s2 = s.detach().clone().requires_grad_(True)
    ours = divergence(name, s, t, mask, temperature=T, beta=beta, chunk=3)
    want = ref(name, s2, t, mask, T, beta)
    assert ours.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    (g,), (g_ref,) = torch.autograd.grad(ours, s), torch.autograd.grad(want, s2)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)


def test_jsd_ends_are_the_two_kls():
    s, t, mask = setup(3)
    for T in (1.0, 2.0):
        assert jsd(s, t, mask, beta=0.0, temperature=T).item() == pytest.approx(
            forward_kl(s, t, mask, temperature=T).item(), rel=1e-6)
        assert jsd(s, t, mask, beta=1.0, temperature=T).item() == pytest.approx(
            reverse_kl(s, t, mask, temperature=T).item(), rel=1e-6)
    # and the ends are the normalized limits of the mixture formula (tame logits: the O(beta)
    # correction grows with the ratio q / p)
    s, t = logits(2, 5, 9, seed=3, scale=0.5), logits(2, 5, 9, seed=4, scale=0.5).detach()
    small = 1e-3
    assert (jsd(s, t, mask, beta=small).item() / small) == pytest.approx(forward_kl(s, t, mask).item(), rel=1e-2)
    assert (jsd(s, t, mask, beta=1 - small).item() / small) == pytest.approx(reverse_kl(s, t, mask).item(),
                                                                             rel=1e-2)


def test_skew_limits_and_bounds():
    s, t, mask = setup(5)
    assert skew_kl(s, t, mask, skew=0.0).item() == pytest.approx(forward_kl(s, t, mask).item(), rel=1e-6)
    assert skew_reverse_kl(s, t, mask, skew=0.0).item() == pytest.approx(reverse_kl(s, t, mask).item(), rel=1e-6)
    assert skew_kl(s, t, mask, skew=1.0).item() == 0.0
    # KL(p || a p + (1-a) q) <= -log(a) per position: bounded where forward KL is not
    a = 0.2
    n = int(mask.sum())
    far = logits(2, 5, 9, seed=9, scale=40.0)
    assert skew_kl(far, t, mask, skew=a).item() <= -torch.log(torch.tensor(a)).item() * n + 1e-4


def test_tv_is_symmetric_and_at_most_one_per_position():
    s, t, mask = setup(7)
    a = total_variation(s, t, mask).item()
    b = total_variation(t, s.detach(), mask).item()
    assert a == pytest.approx(b, rel=1e-6)
    assert 0 <= a <= int(mask.sum())


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_all_divergences_are_zero_against_themselves(name):
    s, _, mask = setup(11)
    assert abs(divergence(name, s, s.detach(), mask, beta=0.3).item()) < 1e-5


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "tv"])
def test_hybrid_with_a_divergence_lean_equals_plain_and_reference(name):
    """distill_loss(divergence=...) = alpha * D + (1 - alpha) * CE, on the plain and the lean path."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, 8, generator=g).requires_grad_(True)
    w = torch.randn(11, 8, generator=g).requires_grad_(True)
    ht, wt = torch.randn(2, 6, 5, generator=g), torch.randn(11, 5, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :2] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    s, t = h @ w.T, ht @ wt.T
    plain = distill_loss(s, t, labels, hybrid(0.7, "soft", name), 2.0, beta=0.4)
    lean = distill_loss(Head(h, w), Head(ht, wt), labels, hybrid(0.7, "soft", name), 2.0, beta=0.4, chunk=4)
    want = 0.7 * ref(name, s, t, mask, 2.0, 0.4) + 0.3 * torch.nn.functional.cross_entropy(
        s[mask], labels[mask], reduction="sum")
    assert plain.item() == pytest.approx(want.item(), rel=1e-5)
    assert lean.item() == pytest.approx(want.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(lean, [h, w]), torch.autograd.grad(want, [h, w])):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


def test_a_top_k_target_is_refused_for_other_divergences():
    s, t, mask = setup()
    with pytest.raises(ValueError, match="forward_kl only"):
        mixed_loss(s, [(topk_targets(t, 3), 1.0)], torch.zeros(2, 5, dtype=torch.long), divergence="jsd")


def test_a_run_with_another_divergence(tmp_path, teacher_dir, chat_file):
    """loss.divergence in config: lean and plain steps agree, and a cached teacher is refused."""
    from accelerate import Accelerator

    from stillroom.errors import UserError
    from stillroom.run.distill import distill

    from conftest import tiny_overrides
    from ddp_grads import step_grads
    acc = Accelerator(cpu=True)
    lean, s_lean, _ = step_grads(str(teacher_dir), str(chat_file), 2, acc, batch_size=2, divergence="jsd",
                                 beta=0.3, lean=True)
    plain, s_plain, _ = step_grads(str(teacher_dir), str(chat_file), 2, acc, batch_size=2, divergence="jsd",
                                   beta=0.3, lean=False)
    assert s_lean["loss"] == pytest.approx(s_plain["loss"], rel=1e-5)
    for k in lean:
        torch.testing.assert_close(lean[k], plain[k], rtol=1e-4, atol=1e-6)
    from stillroom.recipes import load_config
    with pytest.raises(UserError, match="supports forward_kl and hard only"):   # refused when the config is read
        distill(load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "c") +
                            ["loss.divergence=reverse_kl", "teacher.kind=cache", f"teacher.cache={tmp_path}"]),
                progress=False)


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "skew_rkl", "tv"])
def test_masked_teacher_tokens_are_outside_the_support(name):
    """Found by hypothesis: with a teacher -inf entry, dropping the term made reverse KL negative.
    The student is compared on the teacher's support, renormalized there: >= 0, and equal to the
    same divergence on the vocabulary without that token."""
    s = torch.tensor([[[0.0154, -0.0029, 0.3]]], requires_grad=True)
    t = torch.tensor([[[float("-inf"), 0.0057, -0.2]]])
    d = divergence(name, s, t, beta=0.3)
    assert d.item() >= 0
    assert d.item() == pytest.approx(divergence(name, s[..., 1:], t[..., 1:], beta=0.3).item(), abs=1e-6)
    (g,) = torch.autograd.grad(d, s)
    assert torch.isfinite(g).all() and g[0, 0, 0] == 0
