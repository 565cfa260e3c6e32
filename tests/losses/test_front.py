"""The losses' front door: `distill_loss(student, targets, labels, terms, temperature)` picks the
closed-form kernel or the general engine, and the two give the same values and gradients wherever
both apply; the choice follows `kernel_fits`, the rule objectives read too."""
import pytest
import torch

import stillroom.losses.front as front
from stillroom.losses import IGNORE_INDEX, DIVERGENCES, Head, Mixture, distill_loss, hybrid, kernel_fits, topk_targets
from stillroom.losses.general import general_loss

from conftest import kd_inputs


def _data(seed=0):
    """(student logits, teacher logits, labels) in float64: test_methods_losses' tensors."""
    s, t, y = kd_inputs(seed, 2, 6, 13)
    return s.double(), t.double(), y


def _both(fn, s):
    s = s.clone().requires_grad_(True)
    v = fn(s)
    (g,) = torch.autograd.grad(v, s)
    return v.detach(), g


def _engines(monkeypatch):
    """Record which engine each distill_loss call reaches."""
    seen = []
    for name in ("mixed_loss", "linear_mixed_loss", "general_loss"):
        real = getattr(front, name)
        monkeypatch.setattr(front, name, lambda *a, _r=real, _n=name, **k: (seen.append(_n), _r(*a, **k))[1])
    return seen


@pytest.mark.parametrize("name", [*sorted(DIVERGENCES), "hard"])
def test_the_kernel_and_the_general_engine_agree_on_every_term(name, monkeypatch):
    s, t, y = _data()
    terms = {name: 0.7, "ce": 0.3}
    seen = _engines(monkeypatch)
    v_k, g_k = _both(lambda x: distill_loss(x, t, y, terms, 2.0, beta=0.3), s)
    assert seen == ["mixed_loss"]
    v_g, g_g = _both(lambda x: general_loss(x, [(t, 1.0)], y, terms, 2.0, 0.3), s)
    torch.testing.assert_close(v_k, v_g.to(v_k.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_k, g_g, rtol=1e-4, atol=1e-6)
    # parts= asks for the raw sums: the general engine answers, with the same value
    seen.clear()
    parts = {}
    v_p, g_p = _both(lambda x: distill_loss(x, t, y, terms, 2.0, beta=0.3, parts=parts), s)
    assert seen == ["general_loss"] and set(parts) == {name, "ce"}
    torch.testing.assert_close(v_p, v_k.to(v_p.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_p, g_k, rtol=1e-4, atol=1e-6)


def test_hybrid_is_the_seeds_formula():
    s, t, y = _data(1)
    T, alpha = 2.0, 0.6
    keep = y != IGNORE_INDEX
    p = torch.softmax(t / T, -1)
    kl = (p * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1)[keep].sum()
    ce = torch.nn.functional.cross_entropy(s[keep], y[keep], reduction="sum")
    ref = alpha * T * T * kl + (1 - alpha) * ce
    got = distill_loss(s, t, y, hybrid(alpha), T)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert hybrid(0.25, "hard") == {"hard": 0.25, "ce": 0.75}
    assert hybrid(0.5, divergence="jsd") == {"jsd": 0.5, "ce": 0.5}
    for bad in ({"alpha": 1.5}, {"alpha": -0.1}, {"kind": "medium"}):
        with pytest.raises(ValueError):
            hybrid(**bad)


def test_a_head_student_takes_the_lean_kernel_with_the_logits_value(monkeypatch):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 6, 5, generator=g)
    w, b = torch.randn(13, 5, generator=g), torch.randn(13, generator=g)
    _, t, y = _data(2)
    t = t.float()
    seen = _engines(monkeypatch)
    lean = distill_loss(Head(h, w, b), t, y, hybrid(0.5), 2.0)
    plain = distill_loss(h @ w.T + b, t, y, hybrid(0.5), 2.0)
    assert seen == ["linear_mixed_loss", "mixed_loss"]
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-5)
    # a Head student where the kernel does not fit: the general engine on its logits, same value
    seen.clear()
    general = distill_loss(Head(h, w, b), t, y, {"forward_kl": 0.5, "reverse_kl": 0.2, "ce": 0.3}, 2.0)
    ref = general_loss(h @ w.T + b, [(t, 1.0)], y, {"forward_kl": 0.5, "reverse_kl": 0.2, "ce": 0.3}, 2.0)
    assert seen == ["general_loss"]
    torch.testing.assert_close(general, ref)


def test_a_weighted_list_of_targets_sums_each_targets_terms_and_counts_ce_once(monkeypatch):
    s, t, y = _data(3)
    t2 = _data(4)[1]
    sparse = topk_targets(t2, 4, 2.0)
    seen = _engines(monkeypatch)
    got = distill_loss(s, [(t, 0.3), (sparse, 0.2)], y, {"forward_kl": 1.0, "ce": 0.5}, 2.0)
    assert seen == ["mixed_loss"]
    kl = {"forward_kl": 1.0}
    ref = (0.3 * distill_loss(s, t, y, kl, 2.0) + 0.2 * distill_loss(s, sparse, y, kl, 2.0)
           + distill_loss(s, [], y, {"ce": 0.5}))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the same list with per-token weights: the general engine, target by target, CE once
    seen.clear()
    got_w = distill_loss(s, [(t, 0.3), (t2, 0.2)], y, {"forward_kl": 1.0, "ce": 0.5}, 2.0, token_weight="entropy")
    ref_w = (general_loss(s, [(t, 1.0)], y, {"ce": 0.5, "forward_kl": 0.3}, 2.0, token_weight="entropy")
             + general_loss(s, [(t2, 1.0)], y, {"forward_kl": 0.2}, 2.0, token_weight="entropy"))
    assert seen == ["general_loss"] * 2   # one call per target
    torch.testing.assert_close(got_w, ref_w)


def test_a_mixture_takes_the_general_engine_and_one_teacher_mixed_alone_equals_the_kernel(monkeypatch):
    s, t, y = _data(5)
    t2 = _data(6)[1]
    seen = _engines(monkeypatch)
    one = distill_loss(s, Mixture([(t, 1.0)]), y, hybrid(0.7), 2.0)
    assert seen == ["general_loss"]
    torch.testing.assert_close(one, distill_loss(s, t, y, hybrid(0.7), 2.0), rtol=1e-5, atol=1e-5)
    route = torch.zeros(y.shape, dtype=torch.float64)
    route[1] = 1.0   # example 1 to the first teacher, example 0 to the second
    routed = distill_loss(s, Mixture([(t, route), (t2, 1 - route)]), y, {"forward_kl": 1.0}, 2.0)
    by_hand = (distill_loss(s[1:], t[1:], y[1:], {"forward_kl": 1.0}, 2.0)
               + distill_loss(s[:1], t2[:1], y[:1], {"forward_kl": 1.0}, 2.0))
    torch.testing.assert_close(routed, by_hand, rtol=1e-5, atol=1e-5)


def test_kd_scale_scales_the_teacher_terms_only():
    s, t, y = _data(7)
    kd = distill_loss(s, t, y, {"forward_kl": 1.0}, 2.0)
    ce = distill_loss(s, [], y, {"ce": 1.0})
    got = distill_loss(s, t, y, {"forward_kl": 0.4, "ce": 0.6}, 2.0, kd_scale=3.0)
    torch.testing.assert_close(got, 3.0 * 0.4 * kd + 0.6 * ce, rtol=1e-5, atol=1e-5)


def test_kernel_fits_is_the_rule():
    assert kernel_fits({"forward_kl": 0.5, "ce": 0.5}) and kernel_fits({"ce": 1.0}) and kernel_fits({})
    assert kernel_fits({"hard": 0.0, "ce": 1.0})
    assert not kernel_fits({"forward_kl": 0.5, "reverse_kl": 0.0, "ce": 0.5})   # named is asked for
    assert not kernel_fits({"forward_kl": 1.0}, mixture=True)
    assert not kernel_fits({"forward_kl": 1.0}, token_weight="entropy")
    assert not kernel_fits({"forward_kl": 1.0}, balanced=True)


def test_bad_specs_are_refused():
    s, t, y = _data(8)
    with pytest.raises(ValueError, match="unknown loss term 'kl'"):
        distill_loss(s, t, y, {"kl": 1.0})
    with pytest.raises(ValueError, match="term weights must be >= 0"):
        distill_loss(s, t, y, {"forward_kl": -1.0})
    with pytest.raises(ValueError, match="belongs inside a Mixture"):
        distill_loss(s, [(t, torch.ones(y.shape))], y, {"forward_kl": 1.0})
    with pytest.raises(ValueError, match="top-k target supports forward_kl only"):
        distill_loss(s, topk_targets(t, 3), y, {"jsd": 1.0})
    with pytest.raises(ValueError, match="need a teacher"):
        distill_loss(s, [], y, {"forward_kl": 1.0}, token_weight="entropy")
