"""The general loss path (mixtures, routing, per-token weights, several terms), balancing,
intermediate-layer losses and cross-tokenizer ULD, against written-out references."""
import math

import pytest
import torch

from stillroom.losses import (IGNORE_INDEX, DIVERGENCES, attention_loss, divergence, hidden_loss, mixture_logp,
                              token_weights, topk_targets, uld_loss)
from stillroom.losses.general import general_loss
from stillroom.losses.kernel import mixed_loss
from stillroom.objectives.core import balance_scale

from conftest import kd_inputs

# every test here builds its tensors on the device the suite targets (conftest: STILLROOM_TEST_DEVICE)
pytestmark = pytest.mark.usefixtures("on_device")


def _grad(fn, s):
    x = s.clone().requires_grad_(True)
    v = fn(x)
    v.backward()
    return v.detach(), x.grad


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ce_plus_kd_terms_equal_the_fast_kernel(T):
    s, t, y = kd_inputs()
    ref_v, ref_g = _grad(lambda x: mixed_loss(x, [(t, 0.5)], y, ce_weight=0.3, temperature=T), s)
    v, g = _grad(lambda x: general_loss(x, [(t, 1.0)], y, {"ce": 0.3, "forward_kl": 0.5}, temperature=T), s)
    assert torch.allclose(v, ref_v, atol=1e-5) and torch.allclose(g, ref_g, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_every_divergence_term_equals_its_function(name):
    s, t, y = kd_inputs(1)
    keep = y != IGNORE_INDEX
    ref_v, ref_g = _grad(lambda x: divergence(name, x, t, keep, temperature=2.0, beta=0.3), s)
    v, g = _grad(lambda x: general_loss(x, [(t, 1.0)], y, {name: 1.0}, temperature=2.0, beta=0.3), s)
    assert torch.allclose(v, ref_v, atol=1e-5) and torch.allclose(g, ref_g, atol=1e-6)


def test_weighted_list_is_the_weighted_sum_of_its_terms():
    s, t, y = kd_inputs(2)
    keep = y != IGNORE_INDEX
    ce = general_loss(s, [], y, {"ce": 1.0})
    fkl = divergence("forward_kl", s, t, keep)
    rkl = divergence("reverse_kl", s, t, keep)
    parts = {}
    v = general_loss(s, [(t, 1.0)], y, {"ce": 0.3, "forward_kl": 0.5, "reverse_kl": 0.2}, parts=parts)
    assert torch.allclose(v, 0.3 * ce + 0.5 * fkl + 0.2 * rkl, atol=1e-5)
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert parts["reverse_kl"] == pytest.approx(float(rkl), rel=1e-5)


def test_hard_term_is_ce_against_the_teacher_argmax():
    s, t, y = kd_inputs(3)
    keep = y != IGNORE_INDEX
    top = torch.where(keep, t.argmax(-1), IGNORE_INDEX)
    ref = general_loss(s, [], top, {"ce": 1.0})
    assert torch.allclose(general_loss(s, [(t, 1.0)], y, {"hard": 1.0}), ref, atol=1e-5)


def test_mixture_is_a_valid_distribution_and_reduces_to_its_parts():
    g = torch.Generator().manual_seed(4)
    lps = [torch.log_softmax(torch.randn(6, 9, generator=g) * 3, -1) for _ in range(3)]
    lps[1][:, 0] = float("-inf")   # a teacher that rules a token out
    lps[1] = torch.log_softmax(lps[1], -1)
    w = [0.2, 0.5, 0.3]
    m = mixture_logp(list(zip(lps, w)))
    assert torch.allclose(m.exp().sum(-1), torch.ones(6), atol=1e-6)
    assert (m.exp() >= 0).all()
    ref = sum(wk * lp.exp() for wk, lp in zip(w, lps))
    assert torch.allclose(m.exp(), ref, atol=1e-6)
    # one-hot weights per row (routing) pick each row's teacher exactly
    route = torch.tensor([0, 1, 2, 0, 1, 2])
    onehot = [(route == k).float() for k in range(3)]
    r = mixture_logp(list(zip(lps, onehot)))
    for i, k in enumerate(route.tolist()):
        assert torch.allclose(r[i].exp(), lps[k][i].exp(), atol=1e-6)


def test_mixture_forward_kl_gradient_equals_weighted_targets():
    """d/ds KL(sum w_k p_k || q) = T (q - sum w_k p_k) = the fast kernel's multi-target gradient."""
    s, t, y = kd_inputs(5)
    t2 = torch.randn_like(t)
    _, ref = _grad(lambda x: mixed_loss(x, [(t, 0.25), (t2, 0.75)], y, temperature=2.0), s)
    v, g = _grad(lambda x: general_loss(x, [(t, 0.25), (t2, 0.75)], y, {"forward_kl": 1.0}, temperature=2.0), s)
    assert torch.allclose(g, ref, atol=1e-6)
    # the value is the KL to the mixture (not the mixture of KLs): compute it by hand
    p = 0.25 * torch.softmax(t / 2, -1) + 0.75 * torch.softmax(t2 / 2, -1)
    kl = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1)
    assert float(v) == pytest.approx(float(4 * kl[y != IGNORE_INDEX].sum()), rel=1e-5)


def test_routing_by_example_equals_each_example_with_its_own_teacher():
    s, t, y = kd_inputs(6)
    t2 = torch.randn_like(t)
    w1 = torch.tensor([1.0, 0.0])[:, None].expand(2, 5)
    v = general_loss(s, [(t, w1), (t2, 1 - w1)], y, {"forward_kl": 1.0})
    keep = y != IGNORE_INDEX
    ref = divergence("forward_kl", s[:1], t[:1], keep[:1]) + divergence("forward_kl", s[1:], t2[1:], keep[1:])
    assert torch.allclose(v, ref, atol=1e-5)


def test_topk_teacher_in_the_general_path_is_the_tail_bucket_kl():
    s, t, y = kd_inputs(7, V=20)
    keep = y != IGNORE_INDEX
    top = topk_targets(t, 5)
    ref_v, ref_g = _grad(lambda x: divergence("forward_kl", x, top, keep), s)
    v, g = _grad(lambda x: general_loss(x, [(top, 1.0)], y, {"forward_kl": 1.0}), s)
    assert torch.allclose(v, ref_v, atol=1e-5) and torch.allclose(g, ref_g, atol=1e-5)


def test_token_weights():
    V = 8
    uniform = torch.full((1, V), -math.log(V))
    onehot = torch.full((1, V), float("-inf"))
    onehot[0, 3] = 0.0
    for kind in ("confidence", "entropy"):
        assert float(token_weights(onehot, kind)) == pytest.approx(1.0)
    assert float(token_weights(uniform, "entropy")) == pytest.approx(0.0, abs=1e-6)
    assert float(token_weights(uniform, "confidence")) == pytest.approx(1 / V)
    s, t, y = kd_inputs(8)
    keep = y != IGNORE_INDEX
    # weighted KD = sum_i w_i KL_i, with w_i the teacher's top-1 probability
    w = torch.softmax(t, -1).max(-1).values
    p, lq = torch.softmax(t, -1), torch.log_softmax(s, -1)
    kl = (p * (p.log() - lq)).sum(-1)
    v = general_loss(s, [(t, 1.0)], y, {"forward_kl": 1.0}, token_weight="confidence")
    assert float(v) == pytest.approx(float((w * kl)[keep].sum()), rel=1e-5)


def test_entropy_weight_of_a_one_token_vocabulary_is_one():
    """Issue 14, defect 7: log V = 0 at V = 1 made the entropy weight NaN."""
    assert float(token_weights(torch.zeros(3, 1), "entropy")[0]) == 1.0
    assert torch.isfinite(token_weights(torch.zeros(3, 1), "entropy")).all()


def _flat_topk_teacher():
    """A TopK teacher that is flat (its listed top-1 barely above the rest) and a student that
    strongly prefers a token the teacher did not list: the case where a distribution rebuilt with
    the student's tail puts that unlisted token first."""
    V, k = 12, 3
    t = torch.zeros(1, 2, V)
    t[..., 5], t[..., 2], t[..., 3] = 0.05, 0.02, 0.01   # the teacher's top 3, barely above the rest
    top = topk_targets(t, k)
    s = torch.zeros(1, 2, V)
    s[..., 9] = 8.0                         # token 9: unlisted, the student's favourite
    y = torch.full((1, 2), 1)
    assert (top.ids[..., 0] == 5).all() and not (top.ids == 9).any()
    return s, t, y, top


def test_topk_hard_targets_and_token_weights_come_from_the_teacher_alone():
    """Issue 14, defect 3: with a top-k cache on the general path, the hard term's argmax and the
    confidence / entropy weights read the teacher alone (its listed top-1, its listed mass with the
    tail spread evenly), never a tail rebuilt from the student's probabilities."""
    s, t, y, top = _flat_topk_teacher()
    # hard == CE against the teacher's listed top-1 (TopK.argmax, what the fast path uses)
    want = torch.nn.functional.cross_entropy(s.view(-1, 12), top.argmax().view(-1), reduction="sum")
    got = general_loss(s, [(top, 1.0)], y, {"hard": 1.0})
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # ... and equals the fast path's hard term on the same TopK
    fast = mixed_loss(s, [(top, 1.0)], y, kind="hard")
    assert float(got) == pytest.approx(float(fast), rel=1e-6)
    # token weights: the same as for the teacher's own dense distribution with its tail spread evenly
    V, k = 12, 3
    p = torch.full((V,), float(top.log_tail[0, 0].exp()) / (V - k))
    p[top.ids[0, 0]] = top.logp[0, 0].exp()
    lp = p.log()[None]
    for kind in ("confidence", "entropy"):
        w = float(token_weights(lp, kind)[0])
        v = general_loss(s, [(top, 1.0)], y, {"forward_kl": 1.0}, token_weight=kind)
        plain = general_loss(s, [(top, 1.0)], y, {"forward_kl": 1.0})
        assert float(v) == pytest.approx(w * float(plain), rel=1e-5), kind


def test_balance_keeps_the_weighted_terms_at_the_configured_ratio():
    # a KD term 1000x smaller than CE (easydistill#34)
    ce, kd = 3.0, 0.003
    scale = balance_scale(ce, kd)
    alpha = 0.9
    ratio = alpha * scale * kd / ((1 - alpha) * ce)
    assert ratio == pytest.approx(alpha / (1 - alpha))
    assert balance_scale(None, kd) == 1.0 and balance_scale(ce, 0.0) == 1.0
    assert balance_scale(1.0, 1e-12) == 1e4   # clamped


def test_hidden_losses():
    g = torch.Generator().manual_seed(9)
    h = torch.randn(2, 4, 6, generator=g)
    t = torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    assert float(hidden_loss(t, t, mask, "cosine")) == pytest.approx(0.0, abs=1e-5)
    assert float(hidden_loss(t, t, mask, "mse")) == pytest.approx(0.0, abs=1e-7)
    ref_cos = (1 - (h * t).sum(-1) / (h.norm(dim=-1) * t.norm(dim=-1)))[mask].sum()
    assert float(hidden_loss(h, t, mask, "cosine")) == pytest.approx(float(ref_cos), rel=1e-5)
    assert float(hidden_loss(h, t, mask, "mse")) == pytest.approx(float(((h - t) ** 2).mean(-1)[mask].sum()), rel=1e-5)
    # a projection from another width: shapes follow the teacher's
    proj = torch.nn.Linear(3, 6, bias=False)
    small = torch.randn(2, 4, 3, generator=g)
    v = hidden_loss(small, t, mask, "mse", proj)
    v.backward()
    assert proj.weight.grad.shape == (6, 3) and torch.isfinite(proj.weight.grad).all()
    with pytest.raises(ValueError, match="projection"):
        hidden_loss(small, t, mask, "mse")


def test_attention_transfer():
    g = torch.Generator().manual_seed(10)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))

    def attn(B, H):
        a = torch.randn(B, H, 5, 5, generator=g).masked_fill(~causal, float("-inf"))
        return torch.softmax(a, -1)
    s, t = attn(2, 2), attn(2, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert float(attention_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    sm, tm = s.mean(1), t.mean(1)
    ref = torch.where(tm > 0, tm * (tm.log() - sm.log()), 0.0).sum(-1).sum()
    assert float(attention_loss(s, t, mask)) == pytest.approx(float(ref), rel=1e-5)
    assert float(attention_loss(s, t, mask)) >= 0


def _uld_ref(s, t, T=1.0):
    q, p = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    n = max(q.shape[-1], p.shape[-1])
    qs = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, n - q.shape[-1]))
    ps = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, n - p.shape[-1]))
    return T * T * (qs - ps).abs().sum()


@pytest.mark.parametrize("Vs,Vt", [(7, 13), (13, 7), (9, 9)])
def test_uld_matches_the_sorted_wasserstein_reference(Vs, Vt):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, Vs, generator=g) * 2
    t = torch.randn(6, Vt, generator=g) * 2
    ref_v, ref_g = _grad(lambda x: _uld_ref(x, t, 2.0), s)
    v, gr = _grad(lambda x: uld_loss(x, t, 2.0, chunk=4), s)
    assert torch.allclose(v, ref_v, atol=1e-5) and torch.allclose(gr, ref_g, atol=1e-6)


def test_uld_is_zero_for_a_relabelled_copy_and_match_term_sees_the_labels():
    g = torch.Generator().manual_seed(12)
    t = torch.randn(4, 10, generator=g)
    perm = torch.randperm(10, generator=g)
    s = t[:, perm]   # the same distribution under other token ids
    assert float(uld_loss(s, t)) == pytest.approx(0.0, abs=1e-5)
    # exact-match on shared tokens: student id i is teacher id perm[i]
    ids = torch.arange(10)
    assert float(uld_loss(s, t, match=(ids, perm), match_weight=1.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(uld_loss(s, t, match=(ids, ids), match_weight=1.0)) > 0.01
