"""Co-distillation: two or more models trained at once, each teaching the others.

Three modes (config `codistill.mode`), all on the loss of `losses.mutual_loss`:

mutual       Deep Mutual Learning (Zhang et al. 2018). Every process holds every peer; all peers
             see the same batches, and each learns from the true labels and from the others'
             (detached) predictions on them. Under `accelerate launch` the peers are trained
             data-parallel: the same math as one process with the global batch.
predictions  Online distillation (Anil et al. 2018), every step. Process r trains peer r on its own
             shard of the data (CE). Each step all processes also run their peer on one shared
             batch and all-gather the predictions there (full distributions, or the top-k log-probs
             plus the tail mass); each peer distills toward the others' predictions on it.
weights      Anil et al.'s cheap mode. Process r trains peer r on its own shard; every
             `exchange_every` (K) steps the processes exchange weights, and in between each peer
             distills toward its stale copies of the others, run locally on its own batches.
             Communication: one copy of each model per K steps instead of logits every step.

With `train.shard=fsdp` (mutual mode) every peer is sharded across the processes (FSDP2, shard.py)
instead of replicated: the same math, 1/N of each peer's weights and optimizer state per process.

The cross-process modes run one peer per process (launch as many processes as there are peers);
transport is torch.distributed as set up by Accelerate (gloo on CPU, NCCL on GPU).

Loss normalization: in mutual mode as in `loop.accumulate` (sum over all micro-batches and
processes, divided once by the global number of target tokens). In the cross-process modes each
process owns its peer, so its CE term is divided by its own batch's target tokens and the peer
term by the shared (or own) batch's target tokens.

The loop is distill's (loop.fit): each mode is a step strategy over the peers as the loop's
Trainees, so co-distillation has the same bad-step guard, crash handler, data prefetch, signal
handling and atomic checkpoints. Checkpoints: <out>/checkpoints/step_N/<peer>.pt (weights,
optimizer, schedule, and in weights mode the peer's weights at the last exchange -- what the others
hold of it), so every peer resumes exactly. Final: <out>/final/<peer>/ (Hugging Face folders) plus
metrics.json and stillroom.yaml, swapped in atomically.
"""
from __future__ import annotations

import json
import math
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from stillroom.config import CodistillRunConfig, to_yaml
from stillroom.data.examples import micro_batch, model_inputs
from stillroom.errors import UserError
from stillroom.eval import evaluate, tasks
from stillroom.losses import IGNORE_INDEX, general_loss, mixed_loss, mutual_loss, topk_targets
from stillroom.models import core as models
from stillroom.run import faults, shard
from stillroom.run.distill import check_context
from stillroom.run.loop import (Failure, Run, Trainee, agree, average_grads, lr_lambda, make_optimizer,
                                step_counts, to_batch, window)
from stillroom.run.outputs import publish
from stillroom.run.session import Session
from stillroom.run.shard import is_sharded
from stillroom.teachers.core import LiveTeacher

log = logging.getLogger("stillroom")


@dataclass
class Peer(Trainee):
    """A peer the loop trains (in mutual mode under several processes its model is prepared by
    Accelerate but stepped unwrapped, its gradients averaged by step_mutual as loop.accumulate does)."""
    snapshot: dict | None = None    # weights mode: this peer's weights at the last exchange


def _logits(model, b, vocab):
    out = model(**model_inputs(b), use_cache=False).logits
    return out[..., :vocab] if vocab else out


def _targets(n_tokens):
    return max(int(n_tokens), 1)


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


def peer_loss(s, others, labels, t_logits, cfg, share, inplace):
    """One peer's loss sum on one batch: mutual_loss's terms at `peer_share`'s share of the peer
    weight (only CE, + the teacher, during burn-in). With codistill.confidence each peer's term is
    weighted per position by that peer's top-1 probability (general_loss's token weight)."""
    lc, cc = cfg.loss, cfg.codistill
    if share == 1.0 and not cc.confidence:
        return mutual_loss(s, others, labels, lc.alpha, lc.temperature, lc.kind, t_logits, cc.teacher_weight,
                           lc.chunk_rows, inplace)
    w_peer, w_t, w_ce = term_weights(cfg, share, len(others))
    peers = [(o, w_peer) for o in others] if w_peer > 0 else []
    teacher = [(t_logits, w_t)] if w_t > 0 else []
    if not (cc.confidence and peers):
        return mixed_loss(s, peers + teacher, labels, w_ce, lc.temperature, lc.kind, lc.chunk_rows, inplace)
    loss = mixed_loss(s, teacher, labels, w_ce, lc.temperature, lc.kind, lc.chunk_rows)
    term = "hard" if lc.kind == "hard" else "forward_kl"
    for o, w in peers:
        loss = loss + general_loss(s, [(o, 1.0)], labels, {term: w}, lc.temperature, token_weight="confidence",
                                   chunk=lc.chunk_rows)
    return loss


def teacher_logits(teacher, b, cfg, accelerator, vocab):
    """The fixed teacher's logits (a teachers.LiveTeacher), only when it has a weight (the hybrid)."""
    if cfg.codistill.teacher_weight == 0 or cfg.loss.alpha == 0:
        return None
    return teacher.targets(b, "logits")


# ------------------------------------------------------------------------------------ one step per mode

def step_mutual(peers, teacher, batches, cfg, accelerator, vocab, share, failure=None):
    """All peers on the same micro-batches; gradients normalized like loop.accumulate, and under
    several processes synced as there: the peers run unwrapped between two all-reduces that carry
    a failure flag (`failure`: this process's data failed), their gradients averaged after."""
    shared = accelerator.num_processes > 1
    counts = step_counts(batches, accelerator, failure)
    num_tokens = _targets(counts[0])
    scale = accelerator.num_processes / num_tokens
    totals = [0.0] * len(peers)
    sharded = shared and is_sharded(peers[0].model)   # FSDP2: the peers gather and reduce themselves
    models_ = [p.model if sharded or not shared else accelerator.unwrap_model(p.model) for p in peers]
    try:
        for i, b in enumerate(batches):
            faults.point("micro_batch")
            for m in models_ if sharded else []:   # one reduce-scatter per step, after the last micro-batch
                m.set_requires_gradient_sync(i == len(batches) - 1)
            t_logits = teacher_logits(teacher, b, cfg, accelerator, vocab)
            with accelerator.autocast():
                logits = [_logits(m, b, vocab) for m in models_]
            for j in range(len(peers)):
                others = [x.detach() for k, x in enumerate(logits) if k != j]
                # the last peer's logits are nobody's target any more: its gradient may overwrite them
                loss = peer_loss(logits[j], others, b.targets, t_logits, cfg, share,
                                 inplace=j == len(peers) - 1)
                accelerator.backward(loss * scale)
                totals[j] += float(loss.detach())
            del logits
    except Exception as e:
        if not shared or sharded:   # a sharded forward cannot be left halfway: the launcher stops the others
            raise
        failure = Failure.now(e)
    if shared:
        totals = agree(accelerator, failure, totals).tolist()
        for m in [] if sharded else models_:
            average_grads([p for p in m.parameters() if p.requires_grad], accelerator.num_processes)
    return [float(x) / num_tokens for x in totals], int(counts[1])


def _gather_predictions(s, cfg, accelerator):
    """All processes' predictions on the shared batch -> a list indexed by process."""
    world, bsz = accelerator.num_processes, s.shape[0]
    if cfg.codistill.top_k:
        mine = topk_targets(s, cfg.codistill.top_k, cfg.loss.temperature, cfg.loss.chunk_rows)
        ids, logp, tail = accelerator.gather((mine.ids, mine.logp, mine.log_tail))
        return [type(mine)(ids[r * bsz:(r + 1) * bsz], logp[r * bsz:(r + 1) * bsz], tail[r * bsz:(r + 1) * bsz])
                for r in range(world)]
    full = accelerator.gather(s.detach().contiguous())
    return [full[r * bsz:(r + 1) * bsz] for r in range(world)]


def step_predictions(peer, teacher, batches, cfg, accelerator, vocab, share, failure=None):
    """CE on this process's own micro-batches; peer (and teacher) terms on the shared batch.
    A failure on any process stops every one at the next of the step's collectives (a flag
    all-reduce before the gather of predictions, and one at the end), as in loop.accumulate."""
    lc, tw = cfg.loss, cfg.codistill.teacher_weight
    rank, world = accelerator.process_index, accelerator.num_processes
    total, tokens = 0.0, 0
    w_peer, _, w_ce = term_weights(cfg, share, world - 1)
    s = t_logits = None
    try:
        if failure is None:
            own, shared = batches
            n_own = _targets(sum(int((b.targets != IGNORE_INDEX).sum()) for b in own))
            n_shared = _targets((shared.targets != IGNORE_INDEX).sum())
            tokens = sum(int(b.attention_mask.sum()) for b in own) + int(shared.attention_mask.sum())
            if w_peer or (tw and lc.alpha):
                faults.point("micro_batch")
                t_logits = teacher_logits(teacher, shared, cfg, accelerator, vocab)
                with accelerator.autocast():
                    s = _logits(peer.model, shared, vocab)
    except Exception as e:
        failure = Failure.now(e)
    targets = [(t_logits, lc.alpha * tw)] if t_logits is not None else []
    if w_peer:   # every process reaches the gather, or all of them stop before it
        agree(accelerator, failure)
        preds = _gather_predictions(s, cfg, accelerator)
        targets += [(x, w_peer) for r, x in enumerate(preds) if r != rank]
    try:
        if failure is None:
            if s is not None:
                loss = mixed_loss(s, targets, shared.targets, 0.0, lc.temperature, lc.kind, lc.chunk_rows,
                                  inplace_grad=True)
                (loss / n_shared).backward()
                total += float(loss.detach()) / n_shared
            del s, targets
            for b in own:
                faults.point("micro_batch")
                with accelerator.autocast():
                    s = _logits(peer.model, b, vocab)
                loss = mixed_loss(s, [], b.targets, w_ce, lc.temperature, lc.kind, lc.chunk_rows, inplace_grad=True)
                (loss / n_own).backward()
                total += float(loss.detach()) / n_own
    except Exception as e:
        failure = Failure.now(e)
    agree(accelerator, failure)
    return total, tokens


def step_weights(peer, stale, teacher, batches, cfg, accelerator, vocab, share, failure=None):
    """Own micro-batches; the peer terms come from the stale copies of the others, run here. No
    collective inside: one flag all-reduce at the end tells every process of a failure."""
    total, tokens = 0.0, 0
    try:
        if failure is None:
            own = batches[0]
            n_own = _targets(sum(int((b.targets != IGNORE_INDEX).sum()) for b in own))
            tokens = sum(int(b.attention_mask.sum()) for b in own)
            for b in own:
                faults.point("micro_batch")
                t_logits = teacher_logits(teacher, b, cfg, accelerator, vocab)
                others = []
                if share > 0:
                    with torch.no_grad(), accelerator.autocast():
                        others = [_logits(m, b, vocab) for m in stale]
                with accelerator.autocast():
                    s = _logits(peer.model, b, vocab)
                loss = peer_loss(s, others, b.targets, t_logits, cfg, share, inplace=True)
                (loss / n_own).backward()
                total += float(loss.detach()) / n_own
                del s, others
    except Exception as e:
        failure = Failure.now(e)
    agree(accelerator, failure)
    return total, tokens


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


def restore_copies(own_snapshot, copies, rank):
    """After a resume: rebuild every process's stale copies from the owners' saved snapshots."""
    _broadcast_peers(own_snapshot.values(), copies, rank)


def collect_on_main(own_model, peer_models: dict, cfg, rank):
    """Cross-process modes, at the end: process j sends peer j's weights to process 0, which
    holds a model of every peer's shape (transformers lets only rank 0 write model folders)."""
    for j in range(1, len(cfg.peers)):
        if rank == j:
            for t in own_model.state_dict().values():
                dist.send(t.contiguous(), dst=0)
        elif rank == 0:
            for t in peer_models[cfg.peers[j].name].state_dict().values():
                dist.recv(t, src=j)


# ------------------------------------------------------------------------------------ checkpoints

def load_peers(path: Path, owned: list[Peer], accelerator):
    for p in owned:
        f = path / f"{p.name}.pt"
        if not f.is_file():
            raise UserError(f"--resume: checkpoint {path} has no state for peer '{p.name}' "
                            "(were the peers renamed?)")
        state = torch.load(f, map_location="cpu", weights_only=False)  # load_state_dict moves it
        accelerator.unwrap_model(p.model).load_state_dict(state["model"])
        p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        p.snapshot = ({k: v.to(accelerator.device) for k, v in state["snapshot"].items()}
                      if state["snapshot"] is not None else None)


# ------------------------------------------------------------------------------------ evaluation

def columns_before(before: dict, peer_models: dict) -> dict:
    cols = {}
    for name, m in peer_models.items():
        cols[f"{name} before"] = {**before["peers"][name], **evaluate.describe(m)}
    return cols


def final_columns(result, peer_models, teacher, held, cfg, pad_id) -> dict:
    e = cfg.eval
    prompts = evaluate.speed_prompts(held, e.gen_prompts)
    cols = {}
    for name, m in peer_models.items():
        cols[f"{name} after"] = {**result["peers"][name], **evaluate.describe(m),
                                 "gen_tokens_per_s": evaluate.generation_speed(m, prompts, e.gen_tokens, pad_id)}
    cols["ensemble after"] = {**result["ensemble"],
                              "params": sum(models.num_params(m) for m in peer_models.values()),
                              "size_mb": round(sum(models.weights_bytes(m) for m in peer_models.values()) / 2**20, 1)}
    return cols


def table(columns: dict, pairs_before: dict, pairs_after: dict, tokens: int) -> str:
    lines = [evaluate.table(columns, tokens)]
    for k in pairs_after:
        lines.append(f"top-1 agreement between peers {k}: {pairs_before[k]:.1%} before, {pairs_after[k]:.1%} after")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the run

def codistill(cfg: CodistillRunConfig, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    with Session(cfg, overwrite=overwrite, resume=resume, progress=progress) as s:
        return _codistill(s, cfg)


def _codistill(s: Session, cfg: CodistillRunConfig) -> dict:
    accelerator, out, progress = s.accelerator, s.out, s.progress
    rank, world, main = s.rank, s.world, s.main
    mode, cc, n = cfg.codistill.mode, cfg.codistill, len(cfg.peers)
    if mode != "mutual" and world != n:
        raise UserError(f"codistill.mode={mode} trains one peer per process: launch {n} processes for "
                        f"{n} peers (accelerate launch --multi_gpu --num_processes {n} -m stillroom "
                        f"codistill ...); this run has {world}")
    if mode == "mutual" and cc.top_k:
        log.warning("codistill.top_k applies to mode=predictions only; mutual mode uses full distributions")

    dtype = models.teacher_dtype(cfg.teacher.dtype, s.device)
    teacher = models.load(cfg.teacher.model, dtype=dtype)
    s.place(teacher.model, dtype=dtype)
    check_context(cfg, teacher.model.config)
    built = [models.build_student(p, teacher, cfg.train.seed + i) for i, p in enumerate(cfg.peers)]
    models.set_teacher_attention(teacher.model, cfg.teacher.attention, accelerator.device, cfg.data.seq_len)
    vocabs = []
    for i, ((m, tok, _), p) in enumerate(zip(built, cfg.peers)):
        models.set_attention(m, p.attention, f"peers.{i}.attention")
        if cfg.train.gradient_checkpointing:   # activations recomputed in the backward, layer by layer
            models.checkpoint_activations(m)
        w, note = models.check_vocab(teacher.model, teacher.tokenizer, m, tok)
        if note:
            log.warning("peer %s: %s", p.name, note)
        vocabs.append(w)
    vocab = min(vocabs)
    vocab = None if all(models.logits_width(m) == vocab for m, _, _ in built) and \
        models.logits_width(teacher.model) == vocab else vocab
    if mode == "mutual":
        specs = [json.dumps(p.model_dump(exclude={"name", "lr"}), sort_keys=True) for p in cfg.peers]
        for i in range(n):
            for j in range(i + 1, n):
                if specs[i] == specs[j] and cfg.peers[i].init != "config":
                    log.warning("peers %s and %s start identical and see the same batches: they will stay "
                                "identical (give them different layers or inits)", cfg.peers[i].name, cfg.peers[j].name)
    task_items = tasks.from_config(cfg)   # on every process, before the data: a refusal stops them all
    cfg, train, held = s.data(teacher)
    own_data = train if mode == "mutual" else train[rank::world]
    if len(train) < world:
        raise UserError(f"{len(train)} training examples cannot be split into {world} shards")

    s.begin(cfg)   # everything is validated: from here on the output folder is written
    for (m, _, how), p in zip(built, cfg.peers):
        log.info("peer %s (%s): %s params", p.name, how, f"{models.num_params(m):,}")
    log.info("mode %s; %d train / %d held-out examples", mode, len(train), len(held))

    device = s.device
    live = LiveTeacher(teacher.model, vocab=vocab, autocast=accelerator.autocast)
    pad_id = teacher.tokenizer.pad_token_id
    peer_models = {p.name: m for (m, _, _), p in zip(built, cfg.peers)}
    before = None
    # Each model this process runs, on the device before anything runs on it: every peer on the main
    # process (it evaluates them all, and collects them at the end) and in mutual mode; elsewhere the
    # process's own peer (weights mode's stale copies are placed where they are made, below).
    for i in range(n) if main or mode == "mutual" else [rank]:
        s.place(built[i][0])
    if main:
        before = evaluate.score_peers(peer_models, teacher.model, held, pad_id, cfg.eval.batch_size,
                                        cfg.eval.max_batches, vocab, tokenizer=teacher.tokenizer)
        cols_before = columns_before(before, peer_models)
    said = s.tasks_before(task_items, {"teacher": (teacher.model, teacher.tokenizer),
                                       **{f"{k} before": (m, teacher.tokenizer) for k, m in peer_models.items()}})

    # Who trains what: mutual = every peer here; otherwise peer `rank` only.
    owned_idx = list(range(n)) if mode == "mutual" else [rank]
    fsdp = shard.active(cfg, accelerator)   # (mutual mode only: the config refuses the others)
    peers = []
    for i in owned_idx:
        m = built[i][0]
        if fsdp:   # each process keeps 1/N of every peer, its gradients and its optimizer state
            shard.shard(m)
        opt = make_optimizer(m, cfg, cfg.peers[i].lr)
        peers.append(Peer(cfg.peers[i].name, m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))))
    if fsdp:
        log.info("train.shard=fsdp: every peer sharded over %d processes (FSDP2, per decoder layer)", world)
    elif mode == "mutual":
        prepared = accelerator.prepare(*[p.model for p in peers], *[p.optimizer for p in peers])
        for k, p in enumerate(peers):
            p.model, p.optimizer = prepared[k], prepared[n + k]
    copies = []
    if mode == "weights":  # copies[j]: stale copy of peer j (copies[rank] is the live own model)
        copies = [peers[0].model if j == rank else s.place(built[j][0]).eval().requires_grad_(False)
                  for j in range(n)]
    del built
    if not main:  # the other peers' initial models are not needed here any more
        peer_models = {}

    t, names = cfg.train, [p.name for p in cfg.peers]
    saves = main or mode != "mutual"   # mutual: every process holds every peer, the main one saves them

    def make_batches(step):
        if mode == "mutual":
            return [to_batch(mb, pad_id, device) for mb in window(train, step, cfg, rank, world)]
        own = [to_batch(micro_batch(own_data, step * t.grad_accum + i, t.batch_size, t.seed), pad_id, device)
               for i in range(t.grad_accum)]
        shared = (to_batch(micro_batch(train, step, cc.shared_batch_size or t.batch_size, t.seed + 1), pad_id, device)
                  if mode == "predictions" else None)
        return own, shared

    def step_fn(step, batches):
        share = peer_share(step, cc) if cfg.loss.alpha > 0 else 0.0
        failure = batches if isinstance(batches, Failure) else None   # building this process's data failed
        if mode == "mutual":
            losses, tokens = step_mutual(peers, live, batches, cfg, accelerator, vocab, share, failure)
        elif mode == "predictions":
            loss, tokens = step_predictions(peers[0], live, batches, cfg, accelerator, vocab, share, failure)
            losses = [loss]
        else:
            if step % cc.exchange_every == 0:   # weights are whole even when the data failed: take part
                peers[0].snapshot = exchange_weights(peers[0].model, copies, rank)
            stale = [m for j, m in enumerate(copies) if j != rank]
            loss, tokens = step_weights(peers[0], stale, live, batches, cfg, accelerator, vocab, share, failure)
            losses = [loss]
        return {"loss": dict(zip([p.name for p in peers], losses)), "tokens": tokens, "peer_terms": share > 0}

    def record(stats, norms, lrs):
        losses, tokens = list(stats["loss"].values()), stats["tokens"]
        if mode != "mutual":  # one peer per process: collect every peer's numbers for the log
            row = [losses[0], tokens, lrs[0], norms[0]]
            both = accelerator.gather(torch.tensor([row], dtype=torch.float64, device=device))
            losses, tokens, lrs, norms = (both[:, 0].tolist(), int(both[:, 1].sum()), both[:, 2].tolist(),
                                          both[:, 3].tolist())
        fields = {"loss": dict(zip(names, [round(x, 5) for x in losses])), "lr": dict(zip(names, lrs)),
                  "grad_norm": dict(zip(names, [x if math.isfinite(x) else str(x) for x in norms])),
                  "peer_terms": stats["peer_terms"]}
        return fields, tokens

    def mid_eval(step):
        if mode == "mutual":
            if not (main or fsdp):   # sharded peers' forwards are taken by every process together
                return None
            mid = evaluate.score_peers({p.name: accelerator.unwrap_model(p.model) for p in peers},
                                         teacher.model, held, pad_id, cfg.eval.batch_size,
                                         cfg.eval.max_batches, vocab, tokenizer=teacher.tokenizer)["peers"]
        else:   # every process evaluates its own peer; the main one gathers them
            from accelerate.utils import gather_object
            mine = evaluate.score(peers[0].model, teacher.model, held, pad_id, cfg.eval.batch_size,
                                    cfg.eval.max_batches, vocab, tokenizer=teacher.tokenizer)
            mid = dict(gather_object([(peers[0].name, mine)]))
        line = ", ".join(f"{k} perplexity {v.get('perplexity', v.get('student_perplexity')):.3f}"  # peers' / compare's
                         for k, v in mid.items())
        return ({**mid, "step": step}, line) if main else None

    def write_checkpoint(tmp):
        if fsdp:   # every process writes its shards of every peer (torch.distributed.checkpoint)
            for p in peers:
                shard.save(tmp / p.name, p.model, p.optimizer, p.scheduler, main)
            return
        for p in peers if saves else []:
            torch.save({"model": accelerator.unwrap_model(p.model).state_dict(),
                        "optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict(),
                        "snapshot": p.snapshot}, tmp / f"{p.name}.pt")

    def load_checkpoint(path, state):
        if fsdp:
            for p in peers:
                if not (path / p.name / "sharded").is_dir():
                    raise UserError(f"--resume: checkpoint {path} has no sharded state for peer '{p.name}' "
                                    "(was it written without train.shard=fsdp, or were the peers renamed?)")
                shard.load(path / p.name, p.model, p.optimizer, p.scheduler)
            return
        load_peers(path, peers, accelerator)
        if mode == "weights":
            restore_copies(peers[0].snapshot, copies, rank)

    run = Run(cfg, accelerator, peers, out, make_batches, step_fn, record, evaluate=mid_eval,
              write_checkpoint=write_checkpoint, load_checkpoint=load_checkpoint, desc=f"codistill ({mode})",
              progress=progress, agrees=True)
    last_log = s.fit(run)

    # Final: the main process gathers every peer's weights, evaluates them together, writes them.
    if fsdp:   # every process takes part in gathering each peer; the main one rebuilds it whole
        peer_models = {p.name: (p.model, shard.full_state(p.model)) for p in peers}
        peer_models = {k: shard.unsharded(m, whole) for k, (m, whole) in peer_models.items()} if main else {}
    elif mode == "mutual":
        peer_models = {p.name: accelerator.unwrap_model(p.model) for p in peers}
    else:
        collect_on_main(peers[0].model, peer_models, cfg, rank)
        if main:
            peer_models[peers[0].name] = peers[0].model
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not main:
        return {}
    after = evaluate.score_peers(peer_models, teacher.model, held, pad_id, cfg.eval.batch_size,
                                   cfg.eval.max_batches, vocab, tokenizer=teacher.tokenizer)
    prompts = evaluate.speed_prompts(held, cfg.eval.gen_prompts)
    columns = {"teacher": {"perplexity": before["teacher_perplexity"], "bits_per_byte": before["teacher_bits_per_byte"],
                           **evaluate.describe(teacher.model, teacher.path),
                           "gen_tokens_per_s": evaluate.generation_speed(teacher.model, prompts, cfg.eval.gen_tokens, pad_id)}}
    for name in peer_models:
        columns[f"{name} before"] = cols_before[f"{name} before"]
    columns.update(final_columns(after, peer_models, teacher.model, held, cfg, pad_id))
    metrics = {"mode": mode, "eval": columns, "peer_agreement": {"before": before["pairs"], "after": after["pairs"]},
               "held_out_tokens": after["tokens"], "train": last_log, "train_examples": len(train),
               "held_out_examples": len(held)}

    def write(metrics):   # every peer's folder, then the run's records; swapped in atomically
        def fill(tmp):
            for name, m in peer_models.items():
                m.generation_config = teacher.model.generation_config
                m.save_pretrained(tmp / name)
                teacher.tokenizer.save_pretrained(tmp / name)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
            (tmp / "stillroom.yaml").write_text(to_yaml(cfg))
            shutil.copy(out / "metrics.jsonl", tmp / "metrics.jsonl")
        return publish(out, "final", fill, "the final peers")
    return s.finish(metrics, table(columns, before["pairs"], after["pairs"], after["tokens"]), task_items, said,
                    {k: (m, teacher.tokenizer) for k, m in peer_models.items()}, write)
