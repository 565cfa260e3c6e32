"""Co-distillation: two or more models trained at once, each teaching the others.

The three modes (config `codistill.mode`: mutual, predictions, weights) are objectives of the one
loop (objectives/peers.py: what each step computes and exchanges, and its normalization). This
module is the run around them: the teacher and the peers built and checked, the data (in the
cross-process modes each process trains its peer on its own shard), the evaluation before and
after (every peer, their ensemble, the agreement between peers), and final/.

With `train.shard=fsdp` (mutual mode) every peer is sharded across the processes (FSDP2, shard.py)
instead of replicated: the same math, 1/N of each peer's weights and optimizer state per process.
The cross-process modes run one peer per process (launch as many processes as there are peers);
transport is torch.distributed as set up by Accelerate (gloo on CPU, NCCL on GPU).

Checkpoints (outputs.save_trainees): <out>/checkpoints/step_N/<peer>.pt (weights, optimizer,
schedule, and in weights mode the peer's weights at the last exchange -- what the others hold of
it), so every peer resumes exactly. Final: <out>/final/<peer>/ (Hugging Face folders) plus
metrics.json and stillroom.yaml, swapped in atomically.
"""
from __future__ import annotations

import json
import logging
import shutil

import torch
import torch.distributed as dist

from stillroom.config import CodistillRunConfig
from stillroom.recipes import to_yaml
from stillroom.errors import UserError
from stillroom.eval import evaluate, tasks
from stillroom.models import core as models
from stillroom.models import running
from stillroom.objectives.peers import Mutual, Predictions, Weights
from stillroom.run import shard
from stillroom.run.distill import check_context
from stillroom.run.loop import Trainee, lr_lambda, make_optimizer, windows
from stillroom.run.outputs import publish
from stillroom.run.session import Session
from stillroom.teachers.core import load_teacher

log = logging.getLogger("stillroom")


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


# ------------------------------------------------------------------------------------ evaluation

def columns_before(before: dict, peer_models: dict) -> dict:
    """Each peer's column before training (taken then: a sharded peer describes itself otherwise after)."""
    return {f"{name} before": {**before["peers"][name], **evaluate.describe(m)} for name, m in peer_models.items()}


def final_columns(before: dict, cols_before: dict, after: dict, peer_models, teacher, held, cfg, pad_id) -> dict:
    """The table's columns: the teacher (teachers/core.py's: it describes itself), each peer
    before and after, and the peers' ensemble."""
    e = cfg.eval
    prompts = evaluate.speed_prompts(held, e.gen_prompts)
    speed = lambda m: evaluate.generation_speed(m, prompts, e.gen_tokens, pad_id)  # noqa: E731
    cols = {"teacher": teacher.column(before, e, prompts, pad_id)}
    cols.update({f"{name} before": cols_before[f"{name} before"] for name in peer_models})
    for name, m in peer_models.items():
        cols[f"{name} after"] = {**after["peers"][name], **evaluate.describe(m), "gen_tokens_per_s": speed(m)}
    cols["ensemble after"] = {**after["ensemble"],
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
    accelerator, rank, world, main = s.accelerator, s.rank, s.world, s.main
    mode, n = cfg.codistill.mode, len(cfg.peers)
    if mode != "mutual" and world != n:
        raise UserError(f"codistill.mode={mode} trains one peer per process: launch {n} processes for "
                        f"{n} peers (accelerate launch --multi_gpu --num_processes {n} -m stillroom "
                        f"codistill ...); this run has {world}")
    if mode == "mutual" and cfg.codistill.top_k:
        log.warning("codistill.top_k applies to mode=predictions only; mutual mode uses full distributions")
    loaded, teacher, cfg, built, vocab = build_peers(s, cfg)
    task_items = tasks.from_config(cfg)   # on every process, before the data: a refusal stops them all
    cfg, train, held = s.data(loaded)
    teacher.check(cfg, loaded.tokenizer, {"training": train, "held-out": held}, vocab=vocab)
    if len(train) < world:
        raise UserError(f"{len(train)} training examples cannot be split into {world} shards")

    s.begin(cfg)   # everything is validated: from here on the output folder is written
    for (m, _, how), p in zip(built, cfg.peers):
        log.info("peer %s (%s): %s params", p.name, how, f"{models.num_params(m):,}")
    log.info("mode %s; %d train / %d held-out examples", mode, len(train), len(held))
    pad_id, e, tok = loaded.tokenizer.pad_token_id, cfg.eval, loaded.tokenizer
    peer_models = {p.name: m for (m, _, _), p in zip(built, cfg.peers)}
    # Each model this process runs, on the device before anything runs on it: every peer on the main
    # process (it evaluates them all, and collects them at the end) and in mutual mode; elsewhere the
    # process's own peer (weights mode's stale copies are placed where they are made).
    for i in range(n) if main or mode == "mutual" else [rank]:
        s.place(built[i][0])
    score = lambda ms: evaluate.score_peers(ms, teacher.eval_source(), held, pad_id, e.batch_size,  # noqa: E731
                                            e.max_batches, vocab, tokenizer=tok)
    before = score(peer_models) if main else None
    cols_before = columns_before(before, peer_models) if main else None
    asked = {"teacher": (loaded.model, tok)} if loaded.has_weights else {}
    said = s.tasks_before(task_items, {**asked, **{f"{k} before": (m, tok) for k, m in peer_models.items()}})
    fsdp = shard.active(cfg, accelerator)   # (mutual mode only: the config refuses the others)
    peers = trainees(s, cfg, built, fsdp)
    if not teacher.cached:
        teacher.vocab = vocab
    names = [p.name for p in cfg.peers]
    if mode == "mutual":
        objective, batches = Mutual(cfg, teacher, vocab, names), windows(train, cfg, accelerator, pad_id)
    elif mode == "predictions":
        objective = Predictions(cfg, teacher, vocab, names, rank, world)
        batches = objective.batches(train[rank::world], train, s.device, pad_id)
    else:   # copies[j]: the stale copy of peer j (copies[rank] is the live own model)
        copies = [peers[0].model if j == rank else s.place(built[j][0]).eval().requires_grad_(False) for j in range(n)]
        objective = Weights(cfg, teacher, vocab, names, rank, peers[0], copies)
        batches = objective.batches(train[rank::world], train, s.device, pad_id)
    del built
    mid_eval = lambda step: mid_run_eval(s, cfg, peers, score, fsdp, step, held, teacher, tok, vocab)  # noqa: E731
    last_log = s.fit(cfg, peers, objective, batches, evaluate=mid_eval, desc=f"codistill ({mode})")

    peer_models = collect(s, cfg, peers, peer_models, fsdp)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not main:
        return {}
    after = score(peer_models)
    columns = final_columns(before, cols_before, after, peer_models, teacher, held, cfg, pad_id)
    metrics = {"mode": mode, "eval": columns, "peer_agreement": {"before": before["pairs"], "after": after["pairs"]},
               "held_out_tokens": after["tokens"], "train": last_log, "train_examples": len(train),
               "held_out_examples": len(held)}

    def write(metrics):   # every peer's folder, then the run's records; swapped in atomically
        def fill(tmp):
            for name, m in peer_models.items():
                if loaded.has_weights:
                    m.generation_config = loaded.model.generation_config
                m.save_pretrained(tmp / name)
                tok.save_pretrained(tmp / name)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
            (tmp / "stillroom.yaml").write_text(to_yaml(cfg))
            shutil.copy(s.out / "metrics.jsonl", tmp / "metrics.jsonl")
        return publish(s.out, "final", fill, "the final peers")
    return s.finish(metrics, table(columns, before["pairs"], after["pairs"], after["tokens"]), task_items, said,
                    {k: (m, tok) for k, m in peer_models.items()}, write, note=teacher.note())


def build_peers(s: Session, cfg):
    """The teacher (live on its device, a cache, or a server: teachers/core.py's load_teacher)
    and every peer built, each checked against the teacher's vocabulary -> (models.Loaded, the
    teacher the step reads, cfg with a cache's data filled in, [(model, tokenizer, how)], the
    logits width every model is cut to or None)."""
    loaded, teacher, cfg = load_teacher(cfg, s.device, s.place, s.accelerator.autocast)
    s.cfg = cfg   # a cache fills in the data it was built from where data.path is unset
    teacher.check(cfg, loaded.tokenizer)   # a cache or a server against the run, before any peer is built
    check_context(cfg, loaded.model_config())
    built = [models.build_student(p, loaded, cfg.train.seed + i) for i, p in enumerate(cfg.peers)]
    running.set_teacher_attention(loaded.model, cfg.teacher.attention, s.device, cfg.data.seq_len)
    widths = []
    for i, ((m, tok, _), p) in enumerate(zip(built, cfg.peers)):
        running.set_attention(m, p.attention, f"peers.{i}.attention")
        if cfg.train.gradient_checkpointing:   # activations recomputed in the backward, layer by layer
            running.checkpoint_activations(m)
        w, note = models.check_vocab(teacher.width(), loaded.tokenizer, m, tok)
        if note:
            log.warning("peer %s: %s", p.name, note)
        widths.append(w)
    vocab = min(widths)
    t_width = teacher.width() if teacher.cached else models.logits_width(loaded.model)
    if all(models.logits_width(m) == vocab for m, _, _ in built) and t_width == vocab:
        vocab = None
    if cfg.codistill.mode == "mutual":
        specs = [json.dumps(p.model_dump(exclude={"name", "lr"}), sort_keys=True) for p in cfg.peers]
        for i, j in ((i, j) for i in range(len(specs)) for j in range(i + 1, len(specs))):
            if specs[i] == specs[j] and cfg.peers[i].init != "config":
                log.warning("peers %s and %s start identical and see the same batches: they will stay "
                            "identical (give them different layers or inits)", cfg.peers[i].name, cfg.peers[j].name)
    return loaded, teacher, cfg, built, vocab


def trainees(s: Session, cfg, built, fsdp: bool) -> list[Trainee]:
    """The peers this process trains (mutual: every peer, replicated or sharded; otherwise its
    own), each with its optimizer and schedule."""
    mutual, n = cfg.codistill.mode == "mutual", len(cfg.peers)
    peers = []
    for i in range(n) if mutual else [s.rank]:
        m = built[i][0]
        if fsdp:   # each process keeps 1/N of every peer, its gradients and its optimizer state
            shard.shard(m, precision=s.accelerator.mixed_precision)
        opt = make_optimizer(m, cfg, cfg.peers[i].lr)
        peers.append(Trainee(cfg.peers[i].name, m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
                             replicated=mutual))
    if fsdp:
        log.info("train.shard=fsdp: every peer sharded over %d processes (FSDP2, per decoder layer)", s.world)
    elif mutual:
        prepared = s.accelerator.prepare(*[p.model for p in peers], *[p.optimizer for p in peers])
        for k, p in enumerate(peers):
            p.model, p.optimizer = prepared[k], prepared[n + k]
    return peers


def mid_run_eval(s: Session, cfg, peers, score, fsdp, step, held, teacher, tok, vocab):
    """Every peer's held-out scores, on every process (the main one's record and line, else None)."""
    acc, e = s.accelerator, cfg.eval
    if cfg.codistill.mode == "mutual":
        if not (s.main or fsdp):   # sharded peers' forwards are taken by every process together
            return None
        mid = score({p.name: acc.unwrap_model(p.model) for p in peers})["peers"]
    else:   # every process evaluates its own peer; the main one gathers them
        from accelerate.utils import gather_object
        mine = evaluate.score(peers[0].model, teacher.eval_source(), held, tok.pad_token_id, e.batch_size,
                              e.max_batches, vocab, tokenizer=tok)
        mid = dict(gather_object([(peers[0].name, mine)]))
    line = ", ".join(f"{k} perplexity {v.get('perplexity', v.get('student_perplexity')):.3f}"  # peers' / compare's
                     for k, v in mid.items())
    return ({**mid, "step": step}, line) if s.main else None


def collect(s: Session, cfg, peers, peer_models: dict, fsdp: bool) -> dict:
    """Every trained peer, whole, on the main process (empty elsewhere)."""
    acc = s.accelerator
    if fsdp:   # every process takes part in gathering each peer; the main one rebuilds it whole
        whole = {p.name: (p.model, shard.full_state(p.model)) for p in peers}
        return {k: shard.unsharded(m, w) for k, (m, w) in whole.items()} if s.main else {}
    if cfg.codistill.mode == "mutual":
        return {p.name: acc.unwrap_model(p.model) for p in peers}
    collect_on_main(peers[0].model, peer_models, cfg, s.rank)
    return {**peer_models, peers[0].name: peers[0].model} if s.main else {}
