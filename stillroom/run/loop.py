"""The training loop, one for every mode, on Accelerate, top to bottom.

One optimizer step: the step's plan (objective.plan: its term weights, temperature, ...) ->
its micro-batches (a pure function of the step number, so resume is exact; built ahead on a data
thread) -> the objective's batch transform -> their target tokens counted
across all processes, once -> per micro-batch: the objective's loss *sum* -> backward of
sum * num_processes / num_tokens (cancelling DDP's mean over processes) -> clip -> bad-step guard
-> step -> log / eval / save / stop. So 4 micro-batches x 1 process, 1 x 4 and 2 x 2 processes all
produce the same gradient. What only one method needs lives in its objective (objectives/core.py).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from stillroom.data.examples import Batch, micro_batch, to_batch
from stillroom.errors import Stopped, UserError
from stillroom.losses import IGNORE_INDEX
from stillroom.run import faults
from stillroom.run.grads import Reducer, average_grads
from stillroom.run.outputs import checkpoints, load_trainees, read_state, save_checkpoint, save_trainees, trim_metrics
from stillroom.run.shard import grad_norm, is_sharded
from stillroom.run.tracking import hparams, make_accelerator, scalars, set_threads  # noqa: F401 (the loop's setup)

log = logging.getLogger("stillroom")


# ------------------------------------------------------------------------------------ pieces

def lr_lambda(cfg):
    """Linear warmup, then cosine decay to min_lr_ratio of the peak."""
    t = cfg.train

    def f(step):
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(model, cfg, lr=None):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    # fused AdamW on CUDA: one kernel for every parameter's update, as the field's trainers use it
    fused = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    return torch.optim.AdamW(groups, lr=lr or cfg.train.lr, **({"fused": True} if fused else {}))


def window_indices(step, cfg, rank, world) -> list[int]:
    """The global indices of this process's micro-batches for optimizer step `step`: global
    micro-batch j of the step goes to process j % world, so any (processes x grad_accum) split
    sees the same data."""
    per_step = cfg.train.grad_accum * world
    return [step * per_step + i * world + rank for i in range(cfg.train.grad_accum)]


def window(examples, step, cfg, rank, world):
    """This process's micro-batches for optimizer step `step` (see window_indices)."""
    return [micro_batch(examples, j, cfg.train.batch_size, cfg.train.seed)
            for j in window_indices(step, cfg, rank, world)]


@dataclass
class Failure:
    """An exception caught on one process in the local part of a step (see accumulate)."""
    exc: BaseException
    trace: str

    @classmethod
    def now(cls, e):
        return cls(e, traceback.format_exc())


class StepFailed(Exception):
    """A step failed on at least one process, and every process knows it (the failure flag rides
    on the step's own all-reduces), so all of them can save together and stop. `local`: this
    process's Failure, None where another one failed."""

    def __init__(self, local: Failure | None):
        super().__init__("a step failed on another process" if local is None else str(local.exc))
        self.local = local


def agree(accelerator, failure: Failure | None, values=()) -> torch.Tensor:
    """Sum `values` over the processes with each one's failure flag beside them; raises StepFailed
    on every process when any of them failed (`failure` is this one's). -> the summed values."""
    t = torch.tensor([*values, float(failure is not None)], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, "sum")
    if t[-1] > 0:
        raise StepFailed(failure)
    return t[:-1]


def step_counts(batches, accelerator, failure: Failure | None = None) -> list:
    """[target tokens, tokens] of the step's micro-batches over all processes, the step's first
    flagged all-reduce (a failure here, or on another process, raises: StepFailed under several)."""
    if failure is not None and accelerator.num_processes == 1:
        raise failure.exc
    ok = failure is None
    counts = [sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches) if ok else 0,
              sum(int(b.attention_mask.sum()) for b in batches) if ok else 0]
    return agree(accelerator, failure, counts) if accelerator.num_processes > 1 else counts


def accumulate(trainees, objective, batches: list[Batch] | None, plan, accelerator, failure: Failure | None = None) -> dict:
    """Forward + backward over one optimizer step's micro-batches; leaves the summed, correctly
    normalized gradient in every trainee's .grad (its model's and its extra modules'). The
    objective yields each trainee's loss *sum* on a micro-batch (one trainee: distill; every peer:
    mutual learning) and says how it is normalized (objective.scaled: by default times
    num_processes / the step's target tokens over all processes, cancelling the mean over
    processes). Returns the step's loss per trainee, token counts, and each logged term's raw size
    per target token.

    Under several processes the trainees' forward and backward run on the unwrapped models; a
    replicated trainee's gradients are averaged as the step's last backward finishes them, bucket
    by bucket (run/grads.py's Reducer; a trainee owned by one process, as in co-distillation's
    cross-process modes, keeps its own). Every process runs the same collectives in the same
    order: the token counts, the gradient buckets (a process whose step failed takes part all the
    same), then the logged sums. The first and last carry a failure flag, so an exception on one
    process (`failure`, from building the step's data, or raised here) reaches every process as
    StepFailed instead of leaving the others waiting."""
    world = accelerator.num_processes
    shared = world > 1
    counts = step_counts(batches, accelerator, failure)
    num_tokens = max(int(counts[0]), 1)
    totals, parts = {tr.name: 0.0 for tr in trainees}, {}
    replicated = {tr.name: tr.replicated for tr in trainees}
    sharded = shared and is_sharded(trainees[0].model)   # FSDP2: its forward and backward gather and reduce themselves
    models = {tr.name: tr.model if sharded or not shared else accelerator.unwrap_model(tr.model) for tr in trainees}
    # a replicated trainee's gradients are averaged as the last backward finishes them (run/grads.py)
    reducers = [Reducer([p for p in tr.params() if p.requires_grad], world) for tr in trainees
                if tr.replicated and shared and not sharded]
    try:
        for i, b in enumerate(batches or []):
            faults.point("micro_batch")
            for m in models.values() if sharded else []:   # one reduce-scatter per step, after the last micro-batch
                m.set_requires_gradient_sync(i == len(batches) - 1)
            for r in reducers if i == len(batches) - 1 else []:
                r.arm()
            for name, loss_sum, mine in objective.losses(models, b, plan, accelerator):
                scaled = objective.scaled(loss_sum, b, counts, world)
                accelerator.backward(scaled)
                totals[name] += float((loss_sum if replicated[name] else scaled).detach())
                for k, v in mine.items():
                    parts[k] = parts.get(k, 0.0) + v
    except Exception as e:
        if not shared or sharded:   # a sharded model's collectives cannot be left halfway: this process
            raise                   # stops, and the launcher stops the others (the last checkpoint stays)
        failure = Failure.now(e)
    finally:
        for r in reducers:   # every bucket, in order, on every process (a failed one too), before the flag
            r.close()
    for r in reducers:
        r.finish()
    keys = objective.part_keys(plan)
    summed = [n for n in totals if replicated[n]]   # an owned trainee's loss is its process's own
    raw = [parts.get(k, 0.0) for k in keys] + [totals[n] for n in summed]
    if shared:
        raw = agree(accelerator, failure, raw).tolist()
        for tr in (tr for tr in trainees if tr.replicated and sharded):
            # a sharded model reduced its own gradients; its extra modules are averaged here
            average_grads([p for p in tr.extra_params() if p.requires_grad], world)
    totals.update({n: float(v) / num_tokens for n, v in zip(summed, raw[len(keys):])})
    out = {"loss": totals[None] if list(totals) == [None] else totals,
           "target_tokens": int(counts[0]), "tokens": int(counts[1])}
    if keys:   # each term's raw (unweighted) size per target token
        out["terms"] = {k: float(v) / num_tokens for k, v in zip(keys, raw[:len(keys)]) if k in parts}
    return out


class GracefulStop:
    """SIGINT / SIGTERM during training: finish the current step, save a checkpoint, stop (the
    decision is taken together by all processes at a step boundary, so it is never mid-update).
    A second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.signum = None
        self.old = {}
        self.enabled = enabled

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: stopping after this step and saving a checkpoint (Ctrl-C again stops now)",
                    signal.Signals(signum).name)

    def stopped(self, done: int, out: Path) -> Stopped:
        code = 128 + int(self.signum or signal.SIGINT)
        return Stopped(f"stopped by {signal.Signals(code - 128).name} after step {done}: checkpoint "
                       f"{checkpoints(out)[-1]} saved; continue with --resume", code)

    def requested(self, accelerator) -> bool:
        flag = self.signum is not None
        if accelerator.num_processes > 1:
            t = torch.tensor([float(flag)], device=accelerator.device)
            flag = bool(accelerator.reduce(t, "sum").item() > 0)
        return flag


def prefetched(make, steps, enabled=True, waited=None):
    """Yield (step, make(step)) with make(step + 1) already running on a background thread, so the
    data work of the next step overlaps this one's compute. make must be a pure function of step.
    waited: a one-element list that adds up the seconds the steps after the first waited for it."""
    from concurrent.futures import ThreadPoolExecutor

    steps = list(steps)
    if not enabled or not steps:
        yield from ((s, make(s)) for s in steps)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="stillroom-data") as pool:
        nxt = pool.submit(make, steps[0])
        for i, s in enumerate(steps):
            t0 = time.perf_counter()
            ready = nxt.result()
            if waited is not None and i:
                waited[0] += time.perf_counter() - t0
            nxt = pool.submit(make, steps[i + 1]) if i + 1 < len(steps) else None
            yield s, ready


# ------------------------------------------------------------------------------------ the loop

@dataclass
class Trainee:
    """A model the loop trains: prepared (DDP-wrapped under several processes) or sharded, its
    optimizer and schedule. name: None for distill's one student, the peer's name in
    co-distillation. extra: modules trained with it (an objective's projections), clipped and
    averaged with it. replicated: every process trains it on its part of the data (its gradients
    are averaged); False: this process's own (co-distillation's cross-process modes).
    snapshot: weights its checkpoint keeps beside its state (weights mode: its last exchange)."""
    name: str | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    extra: list = ()
    replicated: bool = True
    snapshot: dict | None = None

    def extra_params(self):
        return [p for m in self.extra for p in m.parameters()]

    def params(self):
        return [*self.model.parameters(), *self.extra_params()]


def clip(accelerator, trainee, max_norm: float) -> float:
    """Clip a trainee's gradients to max_norm by their total norm; -> that norm."""
    if is_sharded(trainee.model):
        return grad_norm(trainee.params(), max_norm)
    return float(accelerator.clip_grad_norm_(trainee.params(), max_norm))


def _finite(loss) -> bool:
    return all(math.isfinite(x) for x in (loss.values() if isinstance(loss, dict) else [loss]))


def windows(examples, cfg, accelerator, pad_id) -> Callable:
    """step -> this process's micro-batches of the step (see window), on its device."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    return lambda step: [to_batch(mb, pad_id, device) for mb in window(examples, step, cfg, rank, world)]


@dataclass
class Step:
    """What an objective's prepare sees of the step beside its batches."""
    number: int
    models: dict          # trainee name -> its model, unwrapped
    indices: list         # the global indices of this process's micro-batches (window_indices)
    accelerator: object


def train_step(step: int, bs, trainees, objective, cfg, accelerator):
    """One optimizer step's gradients: the plan, objective.prepare, accumulate -> (plan, stats).
    bs: the step's batches, or the Failure of building them here."""
    plan, world = objective.plan(step), accelerator.num_processes
    models = {tr.name: accelerator.unwrap_model(tr.model) for tr in trainees}
    try:   # on every process, also where the data failed (bs is then its Failure): it may exchange
        bs = objective.prepare(bs, plan, Step(step, models, window_indices(step, cfg, accelerator.process_index, world),
                                              accelerator))
    except StepFailed:
        raise
    except Exception as e:
        if world == 1:
            raise
        bs = Failure.now(e)
    failure = bs if isinstance(bs, Failure) else None
    return plan, accumulate(trainees, objective, None if failure else bs, plan, accelerator, failure)


def fit(trainees: list[Trainee], objective, batches: Callable, *, cfg, accelerator, out: Path, resume: bool,
        evaluate: Callable | None = None, desc: str = "distill", progress: bool = True, signals: bool = True) -> dict:
    """Train the trainees under the objective to cfg.train.max_steps (from the last checkpoint with
    resume); -> the last log record. One step: objective.plan -> its micro-batches (batches(step),
    a pure function of the step, built ahead on the data thread, where the objective reads its
    cached targets) -> objective.prepare (rollouts; co-distillation's exchanges) -> accumulate ->
    clip -> bad-step guard -> step -> log / eval / save / stop. evaluate(step): the mid-run
    evaluation, on every process (-> its log record and a line on the main one, else None).

    Ctrl-C / SIGTERM finish the step, checkpoint and raise Stopped (signals=False: a library leaves
    them alone); a non-finite loss or gradient skips the step (all processes agree), more than
    train.max_bad_steps of them stop the run; a failure mid-step keeps the last completed step's
    state (checkpointed) and raises one line, its traceback in error.log."""
    main, t, world = accelerator.is_main_process, cfg.train, accelerator.num_processes
    start, bad_steps, trained_before = 0, 0, 0.0
    if resume:
        last = checkpoints(out)[-1]
        state = read_state(last)
        load_trainees(last, trainees, accelerator)
        objective.load_state_dict(state)
        start, bad_steps = state["step"], state.get("bad_steps", 0)
        trained_before = state.get("elapsed_s", 0.0)   # training time of the sessions before this one
        if main:
            trim_metrics(out / "metrics.jsonl", start)
        log.info("resumed from %s (step %d)", last, start)
    if t.report_to:
        accelerator.init_trackers("stillroom", config=hparams(cfg.model_dump()))

    metrics_file = open(out / "metrics.jsonl", "a") if main else None
    bar = tqdm(total=t.max_steps, initial=start, desc=desc, unit="step", disable=not (progress and main))
    t_start, tokens_seen, last_log = time.perf_counter(), 0, {}
    for tr in trainees:
        tr.model.train()

    def make_batches(step):
        try:
            bs = batches(step)
            objective.read_ahead(bs, objective.plan(step))
            faults.point("batch")   # on the prefetch thread, while the previous step computes
        except Exception as e:
            if world == 1:
                raise
            return Failure.now(e)   # handed to the step, which tells the other processes
        return bs

    done, saved = start, start if resume else None
    save = lambda at: save_checkpoint(  # noqa: E731
        accelerator, out, at, t.keep_checkpoints, lambda tmp: save_trainees(tmp, trainees, accelerator),
        state={"bad_steps": bad_steps, "elapsed_s": round(trained_before + time.perf_counter() - t_start, 1),
               **objective.state_dict()})
    # A short run logs every step, so its curves have points (train.log_every applies from 50 steps).
    log_every = t.log_every if t.max_steps >= 50 else 1
    waited, waited_then, since, slow_said = [0.0], 0.0, time.perf_counter(), False
    try:
        with GracefulStop(signals) as stop:
            for step, bs in prefetched(make_batches, range(start, t.max_steps), t.prefetch, waited):
                plan, stats = train_step(step, bs, trainees, objective, cfg, accelerator)
                # The norm is taken even without clipping: a non-finite one means a bad step.
                norms = [clip(accelerator, tr, t.max_grad_norm or float("inf")) for tr in trainees]
                good = _finite(stats["loss"]) and all(math.isfinite(n) for n in norms)
                if accelerator.num_processes > 1:   # every process skips the same steps
                    flag = torch.tensor([float(good)], device=accelerator.device)
                    good = bool(accelerator.reduce(flag, "sum").item() == accelerator.num_processes)
                if good:
                    objective.after_step(plan, stats)
                    for tr in trainees:
                        tr.optimizer.step()
                else:
                    bad_steps += 1
                    if accelerator.scaler is not None:   # fp16: the skipped step still backs the loss scale off
                        accelerator.scaler.update()      # (and lets the next step unscale its gradients)
                    log.warning("step %d: non-finite %s: step skipped (%d so far, train.max_bad_steps=%d)",
                                step + 1, "loss" if not _finite(stats["loss"]) else "gradient",
                                bad_steps, t.max_bad_steps)
                    if bad_steps > t.max_bad_steps:
                        have = checkpoints(out)
                        raise UserError(
                            f"stopping at step {step + 1}: {bad_steps} steps had a non-finite loss or gradient "
                            f"(more than train.max_bad_steps={t.max_bad_steps}); lower train.lr or check "
                            "the data" + (f"; the last checkpoint is {have[-1]}" if have else ""))
                for tr in trainees:
                    tr.scheduler.step()
                    tr.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                faults.point("step")
                fields = objective.record(plan, stats, norms, [tr.scheduler.get_last_lr()[0] for tr in trainees], accelerator)
                tokens_seen += stats["tokens"]
                elapsed = time.perf_counter() - t_start
                record = {"step": done, **fields, "tokens_per_s": round(tokens_seen / elapsed, 1),
                          "elapsed_s": round(trained_before + elapsed, 1), "bad_steps": bad_steps}
                if done % log_every == 0 or done == t.max_steps:
                    last_log = record
                    if main:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        faults.point("metrics")
                        if not progress:   # no bar: a plain line at the log cadence instead of silence
                            left = (t.max_steps - done) * elapsed / max(done - start, 1)
                            log.info("%s step %d/%d: loss %s, %.0f tokens/s, %.0f s elapsed, ~%.0f s left",
                                     desc, done, t.max_steps, _loss_text(stats["loss"]),
                                     record["tokens_per_s"], record["elapsed_s"], left)
                    accelerator.log(scalars(record), step=done)
                    now = time.perf_counter()
                    if main and not slow_said and waited[0] - waited_then > 0.2 * (now - since) and done - start > 1:
                        slow_said = True   # once: the data thread (a served teacher's requests) falls behind
                        log.warning("steps %d-%d waited %.0f%% of their time for their batches (read ahead on the "
                                    "data thread: a served teacher's requests, a cache's rows, the data): a served "
                                    "teacher does not keep up; raise teacher.served.concurrency or its server's "
                                    "throughput", done - log_every + 1 if done > log_every else start + 1, done,
                                    100 * (waited[0] - waited_then) / max(now - since, 1e-9))
                    waited_then, since = waited[0], now
                bar.set_postfix(loss=_loss_text(stats["loss"]), tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if t.eval_every and done % t.eval_every == 0 and done != t.max_steps and evaluate:
                    got = evaluate(done)   # on every process: an evaluation may gather
                    faults.point("eval")
                    if main and got is not None:
                        rec, line = got
                        metrics_file.write(json.dumps({"eval": rec}) + "\n")
                        metrics_file.flush()
                        accelerator.log(scalars({k: v for k, v in rec.items() if k != "step"}, "eval/"), step=done)
                        bar.write(f"step {done}: {line}") if progress else log.info("step %d: %s", done, line)
                if t.save_every and done % t.save_every == 0:
                    save(done)
                    saved = done
                if stop.requested(accelerator):
                    if saved != done:
                        save(done)
                    raise stop.stopped(done, out)
    except (UserError, Stopped, KeyboardInterrupt):
        raise
    except StepFailed as e:
        # Every process knows (see accumulate): save the last completed step together, then stop
        # everywhere with the failing process's line.
        from accelerate.utils import gather_object

        failed = gather_object([(accelerator.process_index, type(e.local.exc).__name__,
                                 (str(e.local.exc).splitlines() or [""])[0][:200], e.local.trace)]
                               if e.local is not None else [])
        for tr in trainees:
            tr.optimizer.zero_grad(set_to_none=True)
        if main:
            (out / "error.log").write_text("".join(f"process {r}:\n{trace}\n" for r, _, _, trace in failed))
        note = ""
        if done > start and saved != done:
            save(done)
            note = f"; checkpoint of step {done} saved: fix the cause and continue with --resume"
        elif checkpoints(out):
            note = f"; continue from {checkpoints(out)[-1].name} with --resume"
        rank, kind, first, _ = failed[0]
        raise UserError(f"step {done + 1} failed on process {rank}: {kind}: {first} (traceback in "
                        f"{out / 'error.log'}){note}") from None
    except Exception as e:
        # A failure mid-step (a teacher that breaks, out of memory...): the weights and optimizer
        # are those of the last completed step; keep them, then stop with one line.
        if main:
            (out / "error.log").write_text(traceback.format_exc())
        note = ""
        if accelerator.num_processes == 1 and done > start and saved != done:
            save(done)
            note = f"; checkpoint of step {done} saved: fix the cause and continue with --resume"
        elif checkpoints(out):
            note = f"; continue from {checkpoints(out)[-1].name} with --resume"
        first = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"step {done + 1} failed: {type(e).__name__}: {first} (traceback in "
                        f"{out / 'error.log'}){note}") from None
    bar.close()
    accelerator.wait_for_everyone()
    if main:
        metrics_file.close()
    return last_log   # the caller ends training (accelerator.end_training) after its own collectives


def _loss_text(loss) -> str:
    return f"{loss:.4f}" if not isinstance(loss, dict) else " ".join(f"{k} {x:.3f}" for k, x in loss.items())
