"""Property-based tests (hypothesis): the losses and the config parser on inputs nobody chose."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stillroom.config import Config
from stillroom.recipes import load_config
from stillroom.errors import UserError
from stillroom.losses import IGNORE_INDEX, Head, distill_loss, forward_kl, hybrid, topk_targets
from stillroom.losses.kernel import mixed_loss

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    """Student and teacher logits of a random small shape and scale, labels with some masked."""
    B, S, V = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(2, 17))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 10.0, 60.0]))
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, S, V, generator=g) * scale
    t = torch.randn(B, S, V, generator=g) * scale
    labels = torch.randint(0, V, (B, S), generator=g)
    drop = torch.rand(B, S, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    labels[drop] = IGNORE_INDEX
    if draw(st.booleans()):   # some teacher entries masked to -inf (never all of a row)
        t[..., 0] = float("-inf")
    T = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    alpha = draw(st.floats(0.0, 1.0))
    return s, t, labels, T, alpha


@SETTINGS
@given(problems())
def test_kd_is_finite_non_negative_and_zero_against_itself(p):
    s, t, labels, T, _ = p
    mask = labels != IGNORE_INDEX
    kl = forward_kl(s, t, mask, temperature=T)
    assert torch.isfinite(kl) and kl.item() >= -1e-4 * max(1.0, mask.sum().item())
    assert abs(forward_kl(s, s, mask, temperature=T).item()) <= 1e-4 * max(1.0, mask.sum().item())


@SETTINGS
@given(problems())
def test_hybrid_is_finite_non_negative_with_a_finite_gradient(p):
    s, t, labels, T, alpha = p
    s = s.requires_grad_(True)
    loss = distill_loss(s, t, labels, hybrid(alpha), T)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and loss.item() >= -1e-3
    assert torch.isfinite(g).all()
    assert (g[labels == IGNORE_INDEX] == 0).all()   # masked positions get no gradient


@SETTINGS
@given(problems(), st.integers(0, 2**31 - 1))
def test_masked_positions_do_not_matter(p, seed):
    s, t, labels, T, alpha = p
    masked = labels == IGNORE_INDEX
    g = torch.Generator().manual_seed(seed)
    s2, t2 = s.clone(), t.clone()
    s2[masked] = torch.randn(int(masked.sum()), s.shape[-1], generator=g) * 50
    t2[masked] = torch.randn(int(masked.sum()), s.shape[-1], generator=g) * 50
    a = distill_loss(s, t, labels, hybrid(alpha), T)
    b = distill_loss(s2, t2, labels, hybrid(alpha), T)
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-5)


@SETTINGS
@given(problems(), st.integers(1, 20))
def test_top_k_target_is_a_lower_bound_of_the_dense_kl(p, k):
    s, t, labels, T, _ = p
    t = t.clamp(min=-1e4)   # the sparse rule assumes finite teacher logits in its top-k
    mask = labels != IGNORE_INDEX
    dense = forward_kl(s, t, mask, temperature=T).item()
    sparse = forward_kl(s, topk_targets(t, k, T), mask, temperature=T).item()
    tol = 1e-4 * max(1.0, abs(dense))
    assert -tol <= sparse <= dense + tol


@SETTINGS
@given(problems(), st.integers(1, 9))
def test_lean_path_equals_plain_path(p, chunk):
    s, t, labels, T, alpha = p
    B, S, V = s.shape
    g = torch.Generator().manual_seed(V)
    h = torch.randn(B, S, 5, generator=g).requires_grad_(True)
    w = torch.randn(V, 5, generator=g).requires_grad_(True)
    ht, wt = torch.randn(B, S, 4, generator=g), torch.randn(V, 4, generator=g)
    ref = mixed_loss(h @ w.T, [(ht @ wt.T, alpha)], labels, 1 - alpha, T)
    got = distill_loss(Head(h, w), Head(ht, wt), labels, hybrid(alpha), T, chunk=chunk)
    assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-4)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(ref, [h, w])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ---- the config parser

INT_KEYS = ["train.max_steps", "train.batch_size", "train.grad_accum", "data.seq_len", "loss.chunk_rows",
            "train.log_every", "cache.top_k"]


@SETTINGS
@given(st.sampled_from(INT_KEYS), st.integers(-10**12, 10**12))
def test_integer_overrides_are_accepted_or_refused_cleanly(key, value):
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except UserError as e:
        assert key.split(".")[-1] in str(e)
        return
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


@SETTINGS
@given(st.sampled_from(INT_KEYS + ["loss.alpha", "loss.temperature", "train.lr", "loss.kind", "teacher.model",
                                   "data.pack", "train.report_to"]),
       st.text(max_size=30).filter(lambda x: "\n" not in x and "\r" not in x))
def test_any_text_override_is_accepted_or_refused_cleanly(key, text):
    """Whatever the text, the parser returns a valid config or raises UserError (never anything else)."""
    try:
        cfg = load_config(None, [f"{key}={text}"])
    except UserError:
        return
    Config.model_validate(cfg.model_dump())   # what came back is itself valid
    for f in ("alpha", "temperature"):
        assert math.isfinite(getattr(cfg.loss, f))


@SETTINGS
@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=20),
                min_size=1, max_size=4), st.integers())
def test_unknown_keys_are_refused_cleanly(keys, value):
    try:
        load_config(None, [f"{k}={value}" for k in keys])
    except UserError:
        pass


@SETTINGS
@given(problems(), st.sampled_from(["reverse_kl", "jsd", "skew_kl", "skew_rkl", "tv"]), st.floats(0.0, 1.0))
def test_every_divergence_is_finite_and_non_negative(p, name, beta):
    from stillroom.losses import divergence
    s, t, labels, T, _ = p
    mask = labels != IGNORE_INDEX   # -inf teacher entries included: their terms are dropped, as in forward_kl
    s = s.requires_grad_(True)
    d = divergence(name, s, t, mask, temperature=T, beta=beta)
    (g,) = torch.autograd.grad(d, s)
    assert torch.isfinite(d) and d.item() >= -1e-4 * max(1.0, mask.sum().item())
    assert torch.isfinite(g).all() and (g[~mask] == 0).all()
