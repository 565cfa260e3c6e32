"""The distillation loop, on Accelerate, top to bottom.

One optimizer step: take the step's micro-batches (a pure function of the step number, so resume is
exact) -> count their valid tokens across all processes, once -> for each micro-batch: teacher
logits (no autograd) -> student logits -> loss *sum* -> backward of sum * num_processes / num_tokens
(cancelling DDP's mean over processes) -> clip -> step. So 4 micro-batches x 1 process, 1 x 4 and
2 x 2 processes all produce the same gradient.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from stillroom.config import Config, to_yaml
from stillroom.data.store import load_data, uses_store
from stillroom.errors import UserError
from stillroom.eval import evaluate, tasks
from stillroom.models import core as models
from stillroom.objectives.core import build_objective
from stillroom.run import loop, shard
from stillroom.run.feedback import progress_on
from stillroom.run.loop import Batch, fit, lr_lambda, make_accelerator, make_optimizer, objective_run
from stillroom.run.outputs import (checkpoints, inputs_of, own_output, record_resume, resume_changes, start_output,
                                   write_final)
from stillroom.run.tracking import scalars
from stillroom.teachers.core import load_teachers

log = logging.getLogger("stillroom")


# ------------------------------------------------------------------------------------ pieces

def accumulate(student, teacher, batches: list[Batch], cfg, accelerator, vocab=None, step=0) -> dict:
    """One optimizer step's forward + backward against a teacher model (or a cache.TeacherCache)
    under cfg's loss, for scripts and tests (distill builds its objective once): see
    loop.accumulate. Only the objectives that need nothing but teachers (not hidden-state or
    cross-tokenizer terms)."""
    from stillroom.teachers.cache import TeacherCache
    from stillroom.teachers.core import CachedTeacher, LiveTeacher

    t = (CachedTeacher(teacher) if isinstance(teacher, TeacherCache)
         else LiveTeacher(teacher, vocab=vocab, autocast=accelerator.autocast))
    objective = build_objective(cfg, [t], vocab)
    plan = objective.plan(step)
    return {**loop.accumulate(student, objective, batches, plan, accelerator), "alpha": plan.alpha,
            "temperature": plan.temperature}


def default_data(cfg: Config, teacher: models.Loaded) -> str:
    """The embedded default: the teacher's answers to the bundled prompts, generated once."""
    import hashlib

    from stillroom.teachers.generate import LocalTeacher, generate_file, read_prompts

    g = cfg.generate
    prompts = read_prompts(g.prompts, g.num_prompts, g.prompt_field, g.split, g.system, g.dedup)
    # "answers-2": rows mark answers cut by max_new_tokens (files written before are not reused)
    key = hashlib.sha1(json.dumps(["answers-2", cfg.teacher.model, str(teacher.model.dtype), prompts, g.model_dump()],
                                  sort_keys=True)
                       .encode()).hexdigest()[:12]
    path = models.cache_dir() / "data" / f"answers-{key}.jsonl"
    log.info("data: the teacher's answers to %d prompts (%s)", len(prompts), path)
    from stillroom.run.folders import claim

    # Two runs that need the same answers: the second waits for the first rather than write beside it.
    with claim(path.parent, key="the default data", name=path.name, wait=True):
        generate_file(LocalTeacher(teacher.model, teacher.tokenizer, cfg.teacher.model), prompts, path, g,
                      progress=progress_on())
    return str(path)


def prepare_data(cfg, teacher: models.Loaded, accelerator, tokenizer=None, rows=None, eval_rows=None):
    """-> (cfg with data.path resolved, train examples, held-out examples). With no data.path (and
    no rows in memory) the main process generates the embedded default data once and tells the
    others where it is. tokenizer: the one the data is read with (default the teacher's; a
    cross-tokenizer run reads it with the student's)."""
    if cfg.data.path is None and rows is None:
        cfg = cfg.model_copy(deep=True)
        cfg.data.path = default_data(cfg, teacher) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            holder = [cfg.data.path]
            broadcast_object_list(holder)
            cfg.data.path = holder[0]
    tok = tokenizer or teacher.tokenizer
    if accelerator.num_processes > 1 and uses_store(cfg, rows, eval_rows):
        # the main process builds the store (when it is new); the others open it once it is there
        train, held = load_data(cfg, tok, build=accelerator.is_main_process)
    else:
        train, held = load_data(cfg, tok, rows, eval_rows)
    if not held:
        held = train[: max(1, min(len(train), 8))]
        log.warning("no held-out examples (data.eval_fraction=0, no data.eval_path): "
                    "evaluating on training examples")
    return cfg, train, held


def check_context(cfg, teacher_config):
    models.check_context(cfg.data.seq_len, teacher_config, "teacher", f"data.seq_len={cfg.data.seq_len}")


def eval_columns(student, student_path, teacher, held, cfg, vocab, pad_id, with_teacher=True, cache=None,
                 s_tok=None, cmp=None):
    """s_tok: the student's tokenizer when it differs from the teacher's (cross-tokenizer): the
    teacher is then timed on the same prompts in its own tokens, and perplexities, being per token
    of different tokenizers, are not compared (agreement and KL do not exist across vocabularies)."""
    e = cfg.eval
    cross = s_tok is not None
    if cmp is None:   # (given: the comparison was taken already, by every process with a sharded teacher)
        cmp = evaluate.score(student, None if cross else cache or teacher.model, held, pad_id, e.batch_size,
                             e.max_batches, vocab, tokenizer=s_tok or teacher.tokenizer)
    prompts = evaluate.speed_prompts(held, e.gen_prompts)
    cols = {}
    if with_teacher and cross:   # the teacher in its own tokens, on the same text: per byte
        t_prompts = [teacher.tokenizer(s_tok.decode(p), add_special_tokens=False)["input_ids"] for p in prompts]
        cmp = {**cmp, "teacher_bits_per_byte": evaluate.cross_bits_per_byte(
            teacher.model, teacher.tokenizer, s_tok, held, e.batch_size, e.max_batches)}
        cols["teacher"] = evaluate.teacher_column(teacher.model, teacher.path, cmp, e, t_prompts,
                                                  teacher.tokenizer.pad_token_id)
    elif with_teacher and cache is not None:  # not loaded: no size or speed to measure
        cols["teacher"] = {"perplexity": cmp["teacher_perplexity"], "bits_per_byte": cmp["teacher_bits_per_byte"],
                           "agreement": None, "kl_per_token": None, "params": cache.index.get("teacher_params"),
                           "size_mb": None, "gen_tokens_per_s": None}
    elif with_teacher:
        cols["teacher"] = evaluate.teacher_column(teacher.model, teacher.path, cmp, e, prompts, pad_id)
    cols["student"] = evaluate.student_column(student, student_path, cmp, e, prompts, pad_id)
    return cols, cmp["tokens"]


def distill(cfg: Config, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    out = Path(cfg.train.output_dir)
    with own_output(out, overwrite, resume, inputs_of(cfg)):
        return _distill(cfg, out, overwrite, resume, progress)


def _distill(cfg: Config, out: Path, overwrite: bool, resume: bool, progress: bool) -> dict:
    accelerator = make_accelerator(cfg, out)
    torch.manual_seed(cfg.train.seed)

    cache = None
    if cfg.teacher.kind == "cache":
        from stillroom.teachers.cache import TeacherCache
        cache = TeacherCache(cfg.teacher.cache)
        teacher = models.Loaded.without_weights(cache.tokenizer(), cache.index["teacher"], cache.teacher_config())
        if cfg.data.path is None:  # the data the cache was built from
            cfg = cfg.model_copy(deep=True)
            cfg.data.path = cache.index["data"]["path"]
            cfg.data.eval_path = cache.index["data"]["eval_path"]
    else:   # straight into the dtype it runs in
        teacher = models.load(cfg.teacher.model, dtype=models.teacher_dtype(cfg.teacher.dtype, accelerator.device))
    student, s_tok, how = models.build_student(cfg.student, teacher, cfg.train.seed)
    kept = None   # the teacher layers a from_teacher student was cut from (the hidden-state terms' map)
    if cfg.student.init == "from_teacher" and not cfg.student.model and teacher.has_weights:
        n_t = teacher.model.config.num_hidden_layers
        kept = cfg.student.layers or models.spread_layers(n_t, cfg.student.num_layers or n_t)
    metrics, _ = run_distill(cfg, teacher, cache, student, s_tok, how, accelerator, overwrite=overwrite,
                             resume=resume, progress=progress, kept_layers=kept)
    if metrics and cfg.finetune is not None:
        metrics["finetune"] = finetune_stage(cfg, out, Path(metrics["final"]), resume, progress)
        metrics["table"] += ("\n\nstage 2: fine-tuned on " + cfg.finetune.data + " (CE only)\n"
                             + metrics["finetune"]["table"])
    return metrics


def run_distill(cfg: Config, teacher: models.Loaded, cache, student, s_tok, how: str, accelerator, *,
                rows=None, eval_rows=None, overwrite: bool = False, resume: bool = False, progress: bool = True,
                signals: bool = True, kept_layers=None) -> tuple[dict, object]:
    """Everything after loading: checks, data, objective, the loop, the evaluation and final/.
    teacher: the loaded teacher (its model None when `cache` holds it); rows / eval_rows: data in
    memory instead of data.path. -> (metrics, the trained student), metrics {} off the main process."""
    out = Path(cfg.train.output_dir)
    main = accelerator.is_main_process
    cross = cfg.loss.cross_tokenizer == "uld"
    t_width = cache.index["vocab_size"] if cache else teacher.model
    if cross:
        vocab, note = None, None
        if models.same_tokenizer(s_tok, teacher.tokenizer):
            log.warning("loss.cross_tokenizer=uld with a teacher of the student's own tokenizer: the usual "
                        "loss (cross_tokenizer=none) is exact where ULD is an approximation")
    else:
        try:
            vocab, note = models.check_vocab(t_width, teacher.tokenizer, student, s_tok)
        except UserError as e:
            raise UserError(f"{e} (or set loss.cross_tokenizer=uld to distill across tokenizers)") from None
    if note:
        log.warning(note)
    if cache and vocab < cache.index["vocab_size"]:
        raise UserError(f"the cached teacher's logits ({cache.index['vocab_size']}) are wider than the "
                        f"student's ({vocab}): its top-k ids may not exist in the student")
    check_context(cfg, teacher.model_config())
    # the student is built (a student made from the teacher's config copies its attention)
    models.set_teacher_attention(teacher.model, cfg.teacher.attention, accelerator.device, cfg.data.seq_len)
    for m in cfg.teacher.mix:   # loaded after the data; refused before it
        models.check_attention(m.attention, f"teacher.mix '{m.name}': attention")
    if cache:
        cache.check(cfg, s_tok)  # tokenizer, seq_len, temperature: before reading any data
    if cfg.loss.alpha == 0:
        log.info("loss.alpha=0: plain CE on the data (sequence-level KD when the data is teacher output)")
    tok = s_tok if cross else teacher.tokenizer
    task_items = tasks.from_config(cfg)   # on every process, before the data: a refusal stops them all
    cfg, train, held = prepare_data(cfg, teacher, accelerator, tok, rows, eval_rows)
    if cfg.student.prune_heads or cfg.student.prune_intermediate:
        from stillroom.models.prune import calibrate_and_prune
        student, pruned = calibrate_and_prune(student, train, tok.pad_token_id, cfg.student)
        how = f"{how}, {pruned}"
    if cache:
        cache.check(cfg, s_tok, {"training": train, "held-out": held})
    if len(train) < cfg.train.batch_size:
        log.warning("only %d training examples for train.batch_size=%d", len(train), cfg.train.batch_size)

    pad_id = tok.pad_token_id
    teachers = load_teachers(cfg, cache, teacher.model, vocab, s_tok, accelerator)
    objective = build_objective(cfg, teachers, vocab, student=student, teacher_model=teacher.model,
                                kept_layers=kept_layers, s_tok=s_tok, t_tok=teacher.tokenizer, pad_id=pad_id,
                                eos_id=tok.eos_token_id, device=accelerator.device)
    # Everything is validated: from here on the output folder is written.
    changes = resume_changes(out, cfg) if resume else {}   # on every process: a refusal stops them all
    if main:
        start_output(out, overwrite, resume)
        record_resume(out, changes)
        (out / "config.yaml").write_text(to_yaml(cfg))
    n_params = models.num_params(student)
    t_params = cache.index.get("teacher_params") if cache else models.num_params(teacher.model)
    log.info("teacher %s%s: %s params; student (%s): %s params; %d train / %d held-out examples",
             teacher.source, f" (cached top-{cache.top_k} in {cfg.teacher.cache})" if cache else "",
             f"{t_params:,}" if t_params else "?", how, f"{n_params:,}", len(train), len(held))

    if cache is None:
        teacher.model.to("cpu" if cfg.teacher.offload else accelerator.device,
                         dtype=models.teacher_dtype(cfg.teacher.dtype, accelerator.device))
    source = teachers[0].eval_source()   # what the evaluation reads the teacher from
    if main:
        log.info("evaluating the teacher and the untrained student on %d held-out examples", len(held))
    before, held_tokens = (eval_columns(student, None, teacher, held, cfg, vocab, pad_id, cache=cache,
                                        s_tok=s_tok if cross else None) if main else ({}, 0))
    said = {}   # eval.tasks: the teacher's and the untrained student's answers
    if main and task_items:
        before_models = {"teacher": (teacher.model, teacher.tokenizer)} if teacher.has_weights else {}
        before_models["student before"] = (student, s_tok)
        said = {t: tasks.answer_all(its, before_models, cfg.eval.max_new_tokens, cfg.eval.batch_size, progress,
                                    f"{t}: ") for t, its in task_items.items()}
    if cfg.train.qat != "none":
        from stillroom.deploy.quant import enable
        log.info("quantization-aware: %d linear weights trained through %s", enable(student, cfg.train.qat),
                 cfg.train.qat)
    fsdp = shard.active(cfg, accelerator)
    t_sharded = fsdp and cfg.teacher.shard and cache is None
    if fsdp:   # each process keeps 1/N of the student, its gradients and its optimizer state
        shard.shard(student.to(accelerator.device))
        log.info("train.shard=fsdp: the student sharded over %d processes (FSDP2, per decoder layer)%s",
                 accelerator.num_processes, ", and the teacher" if t_sharded else "")
    if t_sharded:   # (after the evaluation above, which the main process ran alone)
        shard.shard(teacher.model, frozen=True)
    elif cfg.train.shard == "fsdp":
        log.info("train.shard=fsdp in one process: nothing to shard across (launch several with accelerate launch)")
    optimizer = make_optimizer(torch.nn.ModuleList([student, *objective.trained]), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    for m in objective.trained:
        # Not wrapped in DDP: it has no forward of its own for DDP to hook, so its gradients are
        # averaged over the processes once per step (objective.sync_grads) instead.
        m.to(accelerator.device)
        if not fsdp:
            accelerator.register_for_checkpointing(m)
    if not fsdp:   # (a sharded run's checkpoints are its own: loop.objective_run)
        student, optimizer = accelerator.prepare(student, optimizer)
        accelerator.register_for_checkpointing(scheduler)

    def mid_eval(step):
        if not (main or fsdp):   # a sharded student's forward is taken by every process together
            return None
        cmp = evaluate.score(accelerator.unwrap_model(student), source, held, pad_id, cfg.eval.batch_size,
                               cfg.eval.max_batches, vocab)
        if not main:
            return None
        return {**cmp, "step": step}, (f"held-out perplexity {cmp['student_perplexity']:.3f}, agreement "
                                       f"{cmp['agreement']:.1%}, KL {cmp['kl_per_token']:.4f}")

    run = objective_run(cfg, accelerator, student, optimizer, scheduler, objective, train, pad_id, out,
                        evaluate=mid_eval, desc="distill", progress=progress, signals=signals)
    last_log = fit(run, resume)
    cmp = None
    if t_sharded:   # the comparison with a sharded teacher is taken by every process together
        cmp = evaluate.score(student, None if cross else source, held, pad_id, cfg.eval.batch_size,
                             cfg.eval.max_batches, vocab, tokenizer=s_tok if cross else teacher.tokenizer)
    whole = shard.full_state(student) if fsdp else None   # every process takes part; the main one gets it
    if not main:
        accelerator.end_training()
        return {}, accelerator.unwrap_model(student)

    student = shard.unsharded(student, whole) if fsdp else accelerator.unwrap_model(student)
    if cfg.train.qat != "none":   # the evaluation below and final/ see the quantized weights
        from stillroom.deploy.quant import bake
        bake(student)
    log.info("evaluating the trained student; then writing %s", out / "final")
    after, _ = eval_columns(student, None, teacher, held, cfg, vocab, pad_id, with_teacher=False, cache=cache,
                            s_tok=s_tok if cross else None, cmp=cmp)
    columns = {"teacher": before["teacher"], "student before": before["student"],
               "student after": after["student"]}
    accelerator.log(scalars({"student": after["student"], "teacher": before["teacher"]}, "final/"),
                    step=cfg.train.max_steps)
    accelerator.end_training()   # the trackers are closed after the final evaluation is in them
    metrics = {"eval": columns, "held_out_tokens": held_tokens, "train": last_log,
               "train_examples": len(train), "held_out_examples": len(held)}
    if task_items:
        metrics["tasks"] = tasks.in_run(task_items, said, {"student after": (student, s_tok)}, cfg.eval, out, progress)
    final = write_final(out, student, s_tok, cfg, metrics,
                        teacher.model.generation_config if teacher.has_weights and not cross else None,
                        extra=objective.save)
    metrics["table"] = evaluate.table(columns, held_tokens)
    metrics["table"] += tasks.tables(metrics.get("tasks", {}))
    if cache:
        kl = ("KL is over its top-k + one tail bucket, a lower bound of the full KL" if cache.temperature == 1.0
              else f"no KL at T=1 from a cache at T={cache.temperature}")
        metrics["table"] += f"\n(teacher read from the top-{cache.top_k} cache {cfg.teacher.cache}: {kl})"
    metrics["final"] = str(final)
    from stillroom.eval.report import write as write_report
    metrics["report"] = str(write_report(out))
    return metrics, student


def finetune_stage(cfg, out: Path, distilled: Path, resume: bool, progress: bool) -> dict:
    """Multi-stage: the distilled student fine-tuned on labelled data with CE alone, into
    <out>/finetune (its own checkpoints, metrics and final/). The teacher stays the reference in
    the table (a cross-tokenizer run compares with the distilled student instead)."""
    from stillroom.config import LossConfig, StudentConfig

    ft = cfg.finetune
    cross = cfg.loss.cross_tokenizer != "none"
    sub = cfg.model_copy(deep=True)
    sub.finetune = None
    if cross:
        sub.teacher = type(cfg.teacher)(model=str(distilled))
    else:
        sub.teacher = type(cfg.teacher)(model=cfg.teacher.model, dtype=cfg.teacher.dtype)
    sub.student = StudentConfig(init="pretrained", model=str(distilled))
    sub.data = cfg.data.model_copy(update={"path": ft.data, "eval_path": None})
    sub.loss = LossConfig(alpha=0.0, lean=cfg.loss.lean, chunk_rows=cfg.loss.chunk_rows)
    sub.train = cfg.train.model_copy(update={"output_dir": str(out / "finetune"), "max_steps": ft.max_steps,
                                             "lr": ft.lr, "batch_size": ft.batch_size or cfg.train.batch_size,
                                             "warmup_steps": min(cfg.train.warmup_steps, ft.max_steps // 10)})
    log.info("stage 2: fine-tuning %s on %s for %d steps", distilled, ft.data, ft.max_steps)
    again = resume and bool(checkpoints(out / "finetune"))
    return distill(sub, overwrite=not again, resume=again, progress=progress)


def build_cache(cfg, overwrite: bool, progress: bool) -> dict | None:
    """`stillroom cache`: the teacher's top-k over the config's data (cache.source=logprobs: from an
    API's logprobs file, no teacher run) -> the cache's summary; None on a launch's other processes."""
    from types import SimpleNamespace

    from stillroom.run.tracking import launch_state
    from stillroom.teachers.cache import build, existing, summary

    if cfg.cache.source == "logprobs":   # the teacher's tokenizer and config only: no weights are read
        from transformers import AutoConfig

        from stillroom.teachers.api import build_from_logprobs

        if not cfg.data.path:
            raise UserError("cache.source=logprobs reads data.path: the JSONL that `stillroom generate --api "
                            "... --top-logprobs K` wrote")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("cache.source=logprobs only reads a file (no teacher runs): run it as one process, "
                            "without accelerate launch")
        kind, where = models.resolve(cfg.teacher.model)
        build_from_logprobs(cfg, models.load_tokenizer(cfg.teacher.model), AutoConfig.from_pretrained(where),
                            overwrite, progress)
        return summary(cfg.cache.path)
    state, device = launch_state()
    teacher = models.load(cfg.teacher.model, dtype=models.teacher_dtype(cfg.teacher.dtype, device))
    check_context(cfg, teacher.model.config)
    models.set_teacher_attention(teacher.model, cfg.teacher.attention, device, cfg.data.seq_len)
    if state is None or state.is_main_process:   # before any data work
        existing(cfg, teacher.model, teacher.tokenizer, overwrite, skip=("data",))
    cfg, train, held = prepare_data(cfg, teacher, state or SimpleNamespace(is_main_process=True, num_processes=1))
    teacher.model.to(device)
    build(cfg, train + held, teacher.model, teacher.tokenizer, overwrite=overwrite, progress=progress, state=state)
    return summary(cfg.cache.path) if state is None or state.is_main_process else None
