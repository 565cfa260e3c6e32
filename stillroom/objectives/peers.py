"""Co-distillation's objectives: peers teaching each other (config `codistill.mode`), on the loss
of `losses.mutual_loss`. Each is an objective of the one loop (run/loop.py): its trainees are the
peers this process trains, and `losses` yields each peer's loss sum on a micro-batch.

Mutual       Deep Mutual Learning (Zhang et al. 2018). Every process holds every peer (replicated
             trainees); all peers see the same batches, each learns from the true labels and from
             the others' (detached) predictions on them; normalized as distill is (global tokens).
Predictions  Online distillation (Anil et al. 2018), every step. Process r trains peer r on its own
             shard (CE); `prepare` runs its peer on one shared batch and all-gathers the predictions
             there (full distributions, or the top-k log-probs plus the tail mass), toward which
             the peer distills. The CE term is divided by its own batches' target tokens, the peer
             term by the shared batch's.
Weights      Anil et al.'s cheap mode. Process r trains peer r on its own shard; every
             `exchange_every` steps `prepare` exchanges the weights, and in between each peer
             distills toward its stale copies of the others, run locally on its own batches.

The run that builds them (models, data, evaluation, final/) is run/codistill.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stillroom.data.examples import micro_batch, model_inputs, to_batch
from stillroom.losses import IGNORE_INDEX, distill_loss, topk_targets


def peer_share(step: int, cc) -> float:
    """The share of the peer terms' full weight at this step: 0 during burn_in, then rising
    linearly over `ramp` steps (1 at once when ramp is 0). A function of the step: resumes exactly."""
    if step < cc.burn_in:
        return 0.0
    return 1.0 if cc.ramp == 0 else min(1.0, (step - cc.burn_in + 1) / cc.ramp)


def term_weights(cfg, share: float, n_peers: int):
    """(each peer's weight, the teacher's, CE's) at a share of the peer weight. In full:
    alpha (1 - tw) / n_peers, alpha tw, 1 - alpha (mutual_loss's split); what the peers do not
    get during burn-in and the ramp goes to CE."""
    alpha, tw = cfg.loss.alpha, cfg.codistill.teacher_weight
    # the ends written as mutual_loss and burn-in always did, so their weights stay bit-identical
    if share == 1.0:
        return alpha * (1 - tw) / max(n_peers, 1), alpha * tw, 1.0 - alpha
    if share == 0.0:
        return 0.0, alpha * tw, 1 - alpha * tw
    w_peers = alpha * (1 - tw) * share
    return w_peers / max(n_peers, 1), alpha * tw, 1 - alpha * tw - w_peers


def kd_term(cfg) -> str:
    """The peer and teacher terms' name: CE against the argmax (loss.kind hard) or forward KL."""
    return "hard" if cfg.loss.kind == "hard" else "forward_kl"


def peer_loss(s, others, labels, t_logits, cfg, share, inplace):
    """One peer's loss sum on one batch: mutual_loss's terms at `peer_share`'s share of the peer
    weight (only CE, + the teacher, during burn-in). With codistill.confidence each peer's term is
    weighted per position by that peer's top-1 probability (the losses' confidence token weight)."""
    lc, cc = cfg.loss, cfg.codistill
    w_peer, w_t, w_ce = term_weights(cfg, share, len(others))
    peers = [(o, w_peer) for o in others] if w_peer > 0 else []
    teacher = [(t_logits, w_t)] if w_t > 0 else []
    term = kd_term(cfg)
    if not (cc.confidence and peers):
        return distill_loss(s, peers + teacher, labels, {term: 1.0, "ce": w_ce}, lc.temperature,
                            chunk=lc.chunk_rows, inplace_grad=inplace)
    loss = distill_loss(s, teacher, labels, {term: 1.0, "ce": w_ce}, lc.temperature, chunk=lc.chunk_rows)
    for o, w in peers:
        loss = loss + distill_loss(s, [(o, 1.0)], labels, {term: w}, lc.temperature, token_weight="confidence",
                                   chunk=lc.chunk_rows)
    return loss


def logits(model, b, vocab):
    out = model(**model_inputs(b), use_cache=False).logits
    return out[..., :vocab] if vocab else out


def targets(batches) -> int:
    """Micro-batches' target tokens (at least 1: a divisor)."""
    return max(sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches), 1)


@dataclass
class PeerPlan:
    step: int
    share: float   # of the peer terms' weight (peer_share)


class Peers:
    """What the three modes share: the plan, the teacher term, the log record."""
    trained: list = []

    def __init__(self, cfg, teacher, vocab, names: list[str]):
        self.cfg, self.teacher, self.vocab, self.names = cfg, teacher, vocab, names

    @property
    def term(self) -> str:
        return kd_term(self.cfg)

    def plan(self, step: int) -> PeerPlan:
        return PeerPlan(step, peer_share(step, self.cfg.codistill) if self.cfg.loss.alpha > 0 else 0.0)

    def read_ahead(self, batches, plan):
        """A cached or served teacher's targets for the batches its term reads, on the data thread."""
        if self.cfg.codistill.teacher_weight and self.cfg.loss.alpha:
            for b in self.teacher_batches(batches):
                self.teacher.read_ahead(b)

    def teacher_batches(self, batches):
        return batches

    def batches(self, own_data, train, device, pad_id):
        """step -> this process's own micro-batches of its shard (a pure function of the step)."""
        t = self.cfg.train
        return lambda step: [to_batch(micro_batch(own_data, step * t.grad_accum + i, t.batch_size, t.seed), pad_id,
                                      device) for i in range(t.grad_accum)]

    def prepare(self, batches, plan, step):
        return batches

    def teacher_logits(self, b):
        """The fixed teacher's targets (teachers/core.py's: a live model's logits, a cache's or a
        server's top-k), only when it has a weight (the hybrid)."""
        if self.cfg.codistill.teacher_weight == 0 or self.cfg.loss.alpha == 0:
            return None
        return self.teacher.targets(b, "logits")

    def scaled(self, loss_sum, b, counts, world):
        return loss_sum * (world / max(int(counts[0]), 1))

    def part_keys(self, plan):
        return []

    def after_step(self, plan, stats):
        pass

    def record(self, plan, stats: dict, norms: list, lrs: list, accelerator) -> dict:
        losses = list(stats["loss"].values())
        if len(losses) < len(self.names):   # one peer per process: every peer's numbers for the log
            row = torch.tensor([[losses[0], lrs[0], norms[0]]], dtype=torch.float64, device=accelerator.device)
            both = accelerator.gather(row)
            losses, lrs, norms = both[:, 0].tolist(), both[:, 1].tolist(), both[:, 2].tolist()
        return {"loss": dict(zip(self.names, [round(x, 5) for x in losses])), "lr": dict(zip(self.names, lrs)),
                "grad_norm": dict(zip(self.names, [x if math.isfinite(x) else str(x) for x in norms])),
                "peer_terms": plan.share > 0}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class Mutual(Peers):
    """Every peer on the same micro-batches: each peer's loss against the others' detached
    predictions, backwarded before the next peer's is formed."""

    def losses(self, models: dict, b, plan, accelerator):
        t_logits = self.teacher_logits(b)
        with accelerator.autocast():
            out = [logits(m, b, self.vocab) for m in models.values()]
        for j, name in enumerate(models):
            others = [x.detach() for k, x in enumerate(out) if k != j]
            # the last peer's logits are nobody's target any more: its gradient may overwrite them
            yield name, peer_loss(out[j], others, b.targets, t_logits, self.cfg, plan.share,
                                  inplace=j == len(out) - 1), {}


class Predictions(Peers):
    """The step's micro-batches are [the shared batch, *this process's own]; prepare runs the peer
    on the shared one and gathers every process's predictions there (a flagged all-reduce first,
    so a failure anywhere stops every process before the gather)."""

    def __init__(self, cfg, teacher, vocab, names, rank, world):
        super().__init__(cfg, teacher, vocab, names)
        self.rank, self.world = rank, world
        self.shared = self.s = None
        self.terms, self.n_shared, self.n_own = [], 1, 1

    def batches(self, own_data, train, device, pad_id):
        """step -> [the shared batch, *this process's own micro-batches] (a pure function of the step)."""
        t, cc, own = self.cfg.train, self.cfg.codistill, super().batches(own_data, train, device, pad_id)
        return lambda step: [to_batch(micro_batch(train, step, cc.shared_batch_size or t.batch_size, t.seed + 1),
                                      pad_id, device), *own(step)]

    def prepare(self, batches, plan, step):
        from stillroom.run import faults
        from stillroom.run.loop import Failure, agree

        lc, tw, acc = self.cfg.loss, self.cfg.codistill.teacher_weight, step.accelerator
        w_peer = term_weights(self.cfg, plan.share, self.world - 1)[0]
        failure = batches if isinstance(batches, Failure) else None
        self.shared = self.s = t_logits = None
        try:
            if failure is None:
                self.shared, *own = batches
                self.n_shared, self.n_own = targets([self.shared]), targets(own)
                if w_peer or (tw and lc.alpha):
                    faults.point("micro_batch")
                    t_logits = self.teacher_logits(self.shared)
                    with acc.autocast():
                        self.s = logits(step.models[self.names[self.rank]], self.shared, self.vocab)
        except Exception as e:
            failure = Failure.now(e)
        self.terms = [(t_logits, lc.alpha * tw)] if t_logits is not None else []
        if w_peer:   # every process reaches the gather, or all of them stop before it
            agree(acc, failure)
            self.terms += [(x, w_peer) for r, x in enumerate(self.gather(self.s, acc)) if r != self.rank]
        return failure or batches

    def teacher_batches(self, batches):
        return batches[:1]   # the teacher's term is on the shared batch

    def gather(self, s, accelerator):
        """All processes' predictions on the shared batch -> a list indexed by process."""
        cc, bsz = self.cfg.codistill, s.shape[0]
        if cc.top_k:
            mine = topk_targets(s, cc.top_k, self.cfg.loss.temperature, self.cfg.loss.chunk_rows)
            ids, logp, tail = accelerator.gather((mine.ids, mine.logp, mine.log_tail))
            return [type(mine)(ids[r * bsz:(r + 1) * bsz], logp[r * bsz:(r + 1) * bsz], tail[r * bsz:(r + 1) * bsz])
                    for r in range(self.world)]
        full = accelerator.gather(s.detach().contiguous())
        return [full[r * bsz:(r + 1) * bsz] for r in range(self.world)]

    def losses(self, models, b, plan, accelerator):
        lc, (name, model) = self.cfg.loss, next(iter(models.items()))
        if b is self.shared:   # the peer (and teacher) terms, on the forward prepare kept
            if self.s is not None:
                s, terms, self.s, self.terms = self.s, self.terms, None, []
                yield name, distill_loss(s, terms, b.targets, {self.term: 1.0, "ce": 0.0}, lc.temperature,
                                         chunk=lc.chunk_rows, inplace_grad=True), {}
            return
        w_ce = term_weights(self.cfg, plan.share, self.world - 1)[2]
        with accelerator.autocast():
            s = logits(model, b, self.vocab)
        yield name, distill_loss(s, [], b.targets, {self.term: 1.0, "ce": w_ce}, lc.temperature, chunk=lc.chunk_rows,
                                 inplace_grad=True), {}

    def scaled(self, loss_sum, b, counts, world):
        return loss_sum / (self.n_shared if b is self.shared else self.n_own)


class Weights(Peers):
    """Own micro-batches; the peer terms come from stale copies of the others, run here. copies[j]:
    process j's peer (copies[rank] is this process's live one); exchanged in prepare every
    codistill.exchange_every steps, also where the data failed (the weights are whole)."""

    def __init__(self, cfg, teacher, vocab, names, rank, peer, copies):
        super().__init__(cfg, teacher, vocab, names)
        self.rank, self.peer, self.copies, self.n_own = rank, peer, copies, 1

    def prepare(self, batches, plan, step):
        if plan.step % self.cfg.codistill.exchange_every == 0:
            self.peer.snapshot = exchange_weights(self.peer.model, self.copies, self.rank)
        if isinstance(batches, list):
            self.n_own = targets(batches)
        return batches

    def losses(self, models, b, plan, accelerator):
        name, model = next(iter(models.items()))
        t_logits = self.teacher_logits(b)
        others = []
        if plan.share > 0:
            with torch.no_grad(), accelerator.autocast():
                others = [logits(m, b, self.vocab) for j, m in enumerate(self.copies) if j != self.rank]
        with accelerator.autocast():
            s = logits(model, b, self.vocab)
        yield name, peer_loss(s, others, b.targets, t_logits, self.cfg, plan.share, inplace=True), {}

    def scaled(self, loss_sum, b, counts, world):
        return loss_sum / self.n_own

    def load_state_dict(self, state: dict):
        """After a resume: every process's stale copies rebuilt from the owners' saved snapshots."""
        _broadcast_peers(self.peer.snapshot.values(), self.copies, self.rank)


def _broadcast_peers(own_tensors, copies, rank):
    """copies[j] <- peer j's tensors, sent by process j (torch.distributed.broadcast on the group
    Accelerate set up); this process sends `own_tensors` (in state_dict order) as its peer's."""
    for j, m in enumerate(copies):
        for t in (own_tensors if j == rank else m.state_dict().values()):
            dist.broadcast(t, src=j)


def exchange_weights(own_model, copies, rank):
    """Every process ends with every peer's current weights (copies[rank] is the process's own
    live model). Returns this peer's snapshot: what the others now hold of it."""
    _broadcast_peers(own_model.state_dict().values(), copies, rank)
    return {k: v.detach().clone() for k, v in own_model.state_dict().items()}
