"""Mutual learning and sparse (top-k) targets: hand-computed cases, reference formulas, no
gradient into the targets."""
import math

import pytest
import torch

from stillroom.losses import (IGNORE_INDEX, TopK, cross_entropy, forward_kl, hard_label_ce, mutual_loss,
                              topk_targets)
from stillroom.losses.kernel import mixed_loss

from conftest import logits, ref_forward_kl



def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_mutual_loss_on_hand_computed_distributions():
    # Three peers over a 3-token vocabulary, one position, label = token 0, T = 1.
    pa, pb, pc = [0.5, 0.25, 0.25], [0.7, 0.2, 0.1], [0.1, 0.6, 0.3]
    la, lb, lc = (torch.tensor([[[math.log(x) for x in p]]]) for p in (pa, pb, pc))
    y = torch.tensor([[0]])
    alpha = 0.6
    got = mutual_loss(la, [lb, lc], y, alpha=alpha).item()
    want = alpha * 0.5 * (kl(pb, pa) + kl(pc, pa)) + (1 - alpha) * -math.log(0.5)
    assert got == pytest.approx(want, rel=1e-6)
    # at T = 2 both sides are tempered and the KD term scaled by T^2
    T = 2.0

    def soft(p):  # softmax(log p / T)
        z = [x ** (1 / T) for x in p]
        return [x / sum(z) for x in z]
    got = mutual_loss(la, [lb, lc], y, alpha=alpha, temperature=T).item()
    want = alpha * T * T * 0.5 * (kl(soft(pb), soft(pa)) + kl(soft(pc), soft(pa))) + (1 - alpha) * -math.log(0.5)
    assert got == pytest.approx(want, rel=1e-6)
    # hybrid: a fixed teacher takes teacher_weight of alpha, the peers share the rest
    pt = [0.8, 0.1, 0.1]
    lt = torch.tensor([[[math.log(x) for x in pt]]])
    got = mutual_loss(la, [lb, lc], y, alpha=alpha, teacher_logits=lt, teacher_weight=0.25).item()
    want = (alpha * 0.75 * 0.5 * (kl(pb, pa) + kl(pc, pa)) + alpha * 0.25 * kl(pt, pa)
            + (1 - alpha) * -math.log(0.5))
    assert got == pytest.approx(want, rel=1e-6)
    # hard: CE toward each peer's argmax token (b -> 0, c -> 1)
    got = mutual_loss(la, [lb, lc], y, alpha=alpha, kind="hard").item()
    want = alpha * 0.5 * (-math.log(0.5) - math.log(0.25)) + (1 - alpha) * -math.log(0.5)
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_mutual_loss_matches_reference_and_gradient(T):
    s, b, c, t = (logits(2, 5, 11, seed=i) for i in range(4))
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(9))
    y[0, :2] = IGNORE_INDEX
    keep = (y != IGNORE_INDEX).double()
    ours = mutual_loss(s, [b, c], y, alpha=0.7, temperature=T, teacher_logits=t, teacher_weight=0.4)
    (g,) = torch.autograd.grad(ours, s)
    s2 = s.detach().clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(s2.double().view(-1, 11), y.view(-1), reduction="sum")
    ref = (0.7 * 0.6 * 0.5 * (ref_forward_kl(s2, b.detach(), keep, T) + ref_forward_kl(s2, c.detach(), keep, T))
           + 0.7 * 0.4 * ref_forward_kl(s2, t.detach(), keep, T) + 0.3 * ce)
    (g_ref,) = torch.autograd.grad(ref, s2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)


def test_peer_share_burn_in_and_ramp():
    from types import SimpleNamespace

    from stillroom.objectives.peers import peer_share, term_weights
    cc = SimpleNamespace(burn_in=2, ramp=4)
    assert [peer_share(i, cc) for i in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [peer_share(i, SimpleNamespace(burn_in=1, ramp=0)) for i in range(3)] == [0, 1, 1]
    cfg = SimpleNamespace(loss=SimpleNamespace(alpha=0.6), codistill=SimpleNamespace(teacher_weight=0.25))
    for scale in (0.0, 0.3, 1.0):    # the weights always sum to 1: what the peers lack goes to CE
        w_peer, w_t, w_ce = term_weights(cfg, scale, 3)
        assert 3 * w_peer + w_t + w_ce == pytest.approx(1.0)
        assert w_t == pytest.approx(0.15) and w_peer == pytest.approx(0.6 * 0.75 * scale / 3)


@pytest.mark.parametrize("T, scale", [(1.0, 1.0), (2.0, 0.5)])
def test_confidence_weighted_peer_loss_matches_reference(T, scale):
    """codistill.confidence: each peer's KL weighted per position by that peer's top-1 probability
    at T; the teacher and CE terms as in mutual_loss, at the ramp's share of the peer weight."""
    from types import SimpleNamespace

    from stillroom.objectives.peers import peer_loss
    s, b, c, t = (logits(2, 5, 11, seed=i) for i in range(4))
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(9))
    y[0, :2] = IGNORE_INDEX
    keep = (y != IGNORE_INDEX).double()
    cfg = SimpleNamespace(loss=SimpleNamespace(alpha=0.7, temperature=T, kind="soft", chunk_rows=3),
                          codistill=SimpleNamespace(teacher_weight=0.4, confidence=True))
    ours = peer_loss(s, [b.detach(), c.detach()], y, t.detach(), cfg, scale, inplace=False)
    (g,) = torch.autograd.grad(ours, s)
    s2 = s.detach().clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(s2.double().view(-1, 11), y.view(-1), reduction="sum")
    w_peer = 0.7 * 0.6 * scale / 2
    conf = lambda x: torch.softmax(x.detach().double() / T, -1).max(-1).values  # noqa: E731
    ref = (w_peer * (ref_forward_kl(s2, b.detach(), keep * conf(b), T) + ref_forward_kl(s2, c.detach(), keep * conf(c), T))
           + 0.7 * 0.4 * ref_forward_kl(s2, t.detach(), keep, T) + (1 - 0.7 * 0.4 - 2 * w_peer) * ce)
    (g_ref,) = torch.autograd.grad(ref, s2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)


def test_peers_targets_carry_no_gradient():
    a, b = logits(2, 4, 9, seed=1), logits(2, 4, 9, seed=2)
    y = torch.randint(0, 9, (2, 4), generator=torch.Generator().manual_seed(0))
    total = mutual_loss(a, [b], y, alpha=0.5) + mutual_loss(b, [a], y, alpha=0.5)
    total.backward()
    # Each peer's gradient is that of its own loss alone (the other's loss treats it as a constant).
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(mutual_loss(a2, [b.detach()], y, alpha=0.5), a2)
    (gb,) = torch.autograd.grad(mutual_loss(b2, [a.detach()], y, alpha=0.5), b2)
    torch.testing.assert_close(a.grad, ga)
    torch.testing.assert_close(b.grad, gb)
    # and a loss whose only input with a gradient is the target has none to give
    t = logits(2, 4, 9, seed=3)
    loss = forward_kl(logits(2, 4, 9, seed=4).detach(), t)
    assert not loss.requires_grad


def test_topk_with_k_equal_vocab_is_the_dense_loss():
    s, t = logits(3, 4, 13, seed=5), logits(3, 4, 13, seed=6).detach()
    for T in (1.0, 2.0):
        sparse = topk_targets(t, 13, temperature=T)
        assert torch.isinf(sparse.log_tail).all()
        a = forward_kl(s, sparse, temperature=T)
        (ga,) = torch.autograd.grad(a, s)
        b = forward_kl(s, t, temperature=T)
        (gb,) = torch.autograd.grad(b, s)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_tail_bucket_matches_reference(k):
    """KL over the k ids plus one "other" bucket, checked against plain autograd."""
    s, t = logits(2, 3, 10, seed=7), logits(2, 3, 10, seed=8).detach()
    T = 1.5
    sparse = topk_targets(t, k, temperature=T)
    ours = forward_kl(s, sparse, temperature=T)
    (g,) = torch.autograd.grad(ours, s)
    s2 = s.detach().clone().requires_grad_(True)
    log_q = torch.log_softmax(s2.double() / T, -1)
    log_p = torch.log_softmax(t.double() / T, -1)
    ids = sparse.ids
    in_k = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, ids, True)
    lq_tail = torch.logsumexp(log_q.masked_fill(in_k, float("-inf")), -1)
    lp_tail = torch.logsumexp(log_p.masked_fill(in_k, float("-inf")), -1)
    head = (log_p.exp() * (log_p - log_q) * in_k).sum(-1)
    ref = (T * T * (head + lp_tail.exp() * (lp_tail - lq_tail))).sum()
    (g_ref,) = torch.autograd.grad(ref, s2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)
    # the tail bucket only ever loses information: never above the dense KL
    assert ours.item() <= forward_kl(s, t, temperature=T).item() + 1e-5


def test_topk_hard_labels_are_the_argmax():
    s, t = logits(2, 5, 12, seed=9), logits(2, 5, 12, seed=10).detach()
    a = hard_label_ce(s, topk_targets(t, 4))
    b = hard_label_ce(s, t)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_mixed_loss_with_no_targets_is_cross_entropy():
    s = logits(2, 5, 12, seed=11)
    y = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(1))
    assert mixed_loss(s, [], y, ce_weight=1.0).item() == pytest.approx(cross_entropy(s, y).item(), rel=1e-6)
    with pytest.raises(ValueError):
        mixed_loss(s, [(s.detach(), -1.0)], y)
    with pytest.raises(ValueError):
        mutual_loss(s, [], y)
    with pytest.raises(ValueError):
        forward_kl(s, TopK(torch.zeros(2, 4, 3, dtype=torch.long), torch.zeros(2, 4, 3), torch.zeros(2, 4)))


def test_topk_rows_padded_with_no_entry_equal_the_shorter_rows():
    """A row with fewer than k entries, padded with distinct ids at log-prob -inf, is the same
    target as the short row itself (the padded tokens stay in the tail bucket)."""
    s, t = logits(1, 4, 10, seed=12), logits(1, 4, 10, seed=13).detach()
    short = topk_targets(t, 3)
    used = set(short.ids.flatten().tolist())
    spare = [v for v in range(10) if v not in used][:2]
    assert len(spare) == 2
    pad_ids = torch.tensor(spare).expand(1, 4, 2)
    padded = TopK(torch.cat([short.ids, pad_ids], -1),
                  torch.cat([short.logp, torch.full((1, 4, 2), float("-inf"))], -1), short.log_tail)
    a = forward_kl(s, short)
    (ga,) = torch.autograd.grad(a, s)
    b = forward_kl(s, padded)
    (gb,) = torch.autograd.grad(b, s)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    torch.testing.assert_close(ga, gb)


def test_a_mutual_step_gives_each_peer_the_full_mutual_loss(tok):
    """The mutual objective's per-peer loss (and gradient) at share 1 is mutual_loss over the step's target
    tokens (a name clash once passed the gradient's 1/tokens scale on as the peer share)."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from conftest import make_model

    from stillroom.data.examples import Batch
    from stillroom.objectives.peers import Mutual
    from stillroom.run.loop import Trainee, accumulate

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(tok), (2, 9), generator=g)
    targets = ids.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    b = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), targets=targets)
    models_ = [make_model(tok, layers=1, seed=i) for i in range(2)]
    peers = [Trainee(n, m, None, None) for n, m in zip("ab", models_)]
    cfg = SimpleNamespace(loss=SimpleNamespace(alpha=0.6, temperature=2.0, kind="soft", chunk_rows=None),
                          codistill=SimpleNamespace(teacher_weight=0.0, confidence=False, burn_in=0, ramp=0))
    objective = Mutual(cfg, None, None, ["a", "b"])
    losses = list(accumulate(peers, objective, [b], objective.plan(0), Accelerator(cpu=True))["loss"].values())
    n = int((targets != IGNORE_INDEX).sum())
    with torch.no_grad():
        la, lb = (m(input_ids=ids).logits for m in models_)
    assert losses[0] == pytest.approx(float(mutual_loss(la, [lb], targets, 0.6, 2.0)) / n, rel=1e-5)
    assert losses[1] == pytest.approx(float(mutual_loss(lb, [la], targets, 0.6, 2.0)) / n, rel=1e-5)


def test_weights_mode_trains_on_its_own_batches_only(tok):
    """weights mode's step is this process's grad_accum micro-batches of its shard; predictions mode
    adds the shared batch in front (a weights step once trained on the shared batch too)."""
    from types import SimpleNamespace

    from stillroom.data.examples import Example
    from stillroom.objectives.peers import Predictions, Weights

    cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=2, batch_size=2, seed=0),
                          codistill=SimpleNamespace(shared_batch_size=3))
    rows = [Example(ids, list(ids)) for ids in (tok(f"row {i} of the data")["input_ids"] for i in range(8))]
    own = Weights(cfg, None, None, ["a", "b"], 0, None, []).batches(rows[0::2], rows, "cpu", tok.pad_token_id)(0)
    both = Predictions(cfg, None, None, ["a", "b"], 0, 2).batches(rows[0::2], rows, "cpu", tok.pad_token_id)(0)
    assert [len(b.examples) for b in own] == [2, 2]
    assert [len(b.examples) for b in both] == [3, 2, 2]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(own, both[1:]))
