"""distill: one student learns from a teacher, in a run session (run/session.py: the lifecycle
and the devices) on the one loop (run/loop.py: one optimizer step, its normalization).

distill loads the teacher (live or its cache: teachers/core.py, whose objects answer the run's
questions about themselves) and builds the student; run_distill checks them against each other
and the data, builds the objective (objectives/core.py), evaluates before, trains (train_student),
evaluates after and publishes final/. The two-stage fine-tune lives here too (`stillroom cache`: cache.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from stillroom.config import Config
from stillroom.data.store import load_data, uses_store
from stillroom.errors import UserError
from stillroom.eval import evaluate, tasks
from stillroom.models import core as models
from stillroom.models import running
from stillroom.objectives.core import Tokens, build_objective, shared_width
from stillroom.objectives.rules import teacher_terms, weighed_terms
from stillroom.run import loop, shard
from stillroom.run.feedback import progress_on
from stillroom.data.examples import Batch
from stillroom.run.loop import Trainee, lr_lambda, make_optimizer, windows
from stillroom.run.outputs import checkpoints, write_final
from stillroom.run.session import Session
from stillroom.run.tracking import scalars
from stillroom.teachers.core import load_teacher, load_teachers

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
    trainee = Trainee(None, student, None, None, objective.trained)
    return {**loop.accumulate([trainee], objective, batches, plan, accelerator), "alpha": plan.alpha,
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
    path = models.cache_folder("data") / f"answers-{key}.jsonl"
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
    if cfg.data.eval_path and cfg.data.path and Path(cfg.data.eval_path).exists() and \
            Path(cfg.data.eval_path).resolve() == Path(cfg.data.path).resolve():
        log.warning("data.eval_path is data.path: the held-out examples are training examples, so the evaluation "
                    "measures memory, not generalisation")
    if accelerator.num_processes > 1 and uses_store(cfg, rows, eval_rows):
        # the main process builds the store (when it is new); the others open it once it is there
        train, held = load_data(cfg, tok, build=accelerator.is_main_process)
    else:
        train, held = load_data(cfg, tok, rows, eval_rows)
    if not held:
        held = train[: max(1, min(len(train), 8))]
        why = "data.eval_fraction=0" if not cfg.data.eval_fraction else \
            f"a single example cannot be split by data.eval_fraction={cfg.data.eval_fraction}"
        log.warning("no held-out examples (%s, and no data.eval_path): evaluating on training examples", why)
    return cfg, train, held


def check_context(cfg, teacher_config):
    models.check_context(cfg.data.seq_len, teacher_config, "teacher", f"data.seq_len={cfg.data.seq_len}")
    # the evaluation times generation of eval.gen_tokens new tokens (a prompt's worth more must fit too)
    models.check_context(cfg.eval.gen_tokens, teacher_config, "teacher", f"eval.gen_tokens={cfg.eval.gen_tokens}")


def kept_layers(cfg, teacher: models.Loaded):
    """The teacher layers a from_teacher student is cut from (the hidden-state terms' map)."""
    if cfg.student.init != "from_teacher" or cfg.student.model or not teacher.has_weights:
        return None
    n_t = teacher.model.config.num_hidden_layers
    return cfg.student.layers or models.spread_layers(n_t, cfg.student.num_layers or n_t)


def distill(cfg: Config, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    with Session(cfg, overwrite=overwrite, resume=resume, progress=progress) as s:
        sharded = shard.active(cfg, s.accelerator) and cfg.teacher.shard
        if sharded and cfg.data.path is None:
            raise UserError("teacher.shard=true over several processes: the sharded teacher does not generate the "
                            "default data; set data.path (for example to the answers `stillroom generate` wrote)")
        loaded, teacher, cfg = load_teacher(cfg, s.device, s.place, s.accelerator.autocast, sharded)
        s.cfg = cfg   # a cache fills in the data it was built from where data.path is unset
        teacher.check(cfg, loaded.tokenizer)   # a cache or a server against the run, before the student is built
        student, s_tok, how = models.build_student(cfg.student, loaded, cfg.train.seed)
        metrics, _ = run_distill(s, cfg, loaded, teacher, s.place(student), s_tok, how,
                                 kept_layers=kept_layers(cfg, loaded))
        if metrics and cfg.finetune is not None:
            metrics["finetune"] = finetune_stage(cfg, s.out, Path(metrics["final"]), resume, progress)
            metrics["table"] += ("\n\nstage 2: fine-tuned on " + cfg.finetune.data + " (CE only)\n"
                                 + metrics["finetune"]["table"])
        return metrics


def run_distill(s: Session, cfg: Config, loaded: models.Loaded, teacher, student, s_tok, how: str, *,
                rows=None, eval_rows=None, kept_layers=None) -> tuple[dict, object]:
    """Everything after loading, in an open session: checks, data, objective, the loop, the
    evaluation and final/. loaded: the teacher's tokenizer, config and weights (None from a
    cache); teacher: the one the step reads (teachers/core.py: it answers for itself);
    rows / eval_rows: data in memory instead of data.path. -> (metrics, the trained student),
    metrics {} off the main process."""
    vocab = shared_width(cfg, teacher.width(), loaded.tokenizer, student, s_tok)
    check_context(cfg, loaded.model_config())
    # the student is built (a student made from the teacher's config copies its attention)
    running.set_teacher_attention(loaded.model, cfg.teacher.attention, s.device, cfg.data.seq_len)
    running.set_attention(student, cfg.student.attention, "student.attention")
    for m in cfg.teacher.mix:   # loaded after the data; refused before it
        running.check_attention(m.attention, f"teacher.mix '{m.name}': attention")
    teacher.check(cfg, s_tok, vocab=vocab)   # before reading any data
    if not teacher_terms(weighed_terms(cfg)):
        log.info("no teacher term in the loss: plain CE on the data (sequence-level KD when the data is "
                 "teacher output)")
    tokens = Tokens(cfg, s_tok, loaded.tokenizer)
    tok = tokens.data
    task_items = tasks.from_config(cfg)   # on every process, before the data: a refusal stops them all
    cfg, train, held = s.data(loaded, tok, rows, eval_rows)
    if cfg.student.prune_heads or cfg.student.prune_intermediate:
        from stillroom.models.prune import calibrate_and_prune
        student, pruned = calibrate_and_prune(student, train, tok.pad_token_id, cfg.student)
        student, how = s.place(student), f"{how}, {pruned}"
    teacher.check(cfg, s_tok, {"training": train, "held-out": held}, vocab=vocab)
    if len(train) < cfg.train.batch_size:
        log.warning("only %d training examples for train.batch_size=%d", len(train), cfg.train.batch_size)
    teachers = load_teachers(cfg, teacher, vocab, s_tok, s.accelerator)
    objective = build_objective(cfg, teachers, vocab, student=student, teacher_model=loaded.model,
                                kept_layers=kept_layers, s_tok=s_tok, t_tok=loaded.tokenizer, pad_id=tok.pad_token_id,
                                eos_id=tok.eos_token_id, device=s.device)
    s.begin(cfg)   # everything is validated: from here on the output folder is written
    t_params = teacher.params()
    log.info("teacher %s%s: %s params; student (%s): %s params; %d train / %d held-out examples",
             loaded.source, teacher.describe(), f"{t_params:,}" if t_params else "?", how,
             f"{models.num_params(student):,}", len(train), len(held))
    t_tok = tokens.teacher_own
    t_sharded = loaded.has_weights and shard.is_sharded(loaded.model)   # its forward: every process together
    if s.main:
        log.info("evaluating the teacher and the untrained student on %d held-out examples", len(held))
    e = cfg.eval
    cmp = evaluate.score(student, teacher.eval_source(), held, tok.pad_token_id, e.batch_size, e.max_batches, vocab,
                         tokenizer=tok) if t_sharded else None
    before, held_tokens = (evaluate.columns(student, teacher, held, e, vocab, tok, t_tok=t_tok, cmp=cmp)
                           if s.main else ({}, 0))
    # (a sharded teacher answers no tasks: its generation would need every process)
    asked = {"teacher": (loaded.model, loaded.tokenizer)} if loaded.has_weights and not t_sharded else {}
    said = s.tasks_before(task_items, {**asked, "student before": (student, s_tok)})
    student, cmp = train_student(s, cfg, student, teacher, objective, train, held, vocab, tokens)
    if not s.main:
        return {}, student
    log.info("evaluating the trained student; then writing %s", s.out / "final")
    after, _ = evaluate.columns(student, teacher, held, cfg.eval, vocab, tok, t_tok=t_tok, with_teacher=False, cmp=cmp)
    columns = {"teacher": before["teacher"], "student before": before["student"], "student after": after["student"]}
    s.accelerator.log(scalars({"student": after["student"], "teacher": before["teacher"]}, "final/"),
                      step=cfg.train.max_steps)
    s.accelerator.end_training()   # the trackers are closed after the final evaluation is in them
    metrics = {"eval": columns, "held_out_tokens": held_tokens, "train": s.last_log,
               "train_examples": len(train), "held_out_examples": len(held)}
    generation = loaded.model.generation_config if loaded.has_weights and t_tok is None else None
    write = lambda m: write_final(s.out, student, s_tok, cfg, m, generation, extra=objective.save)  # noqa: E731
    return s.finish(metrics, evaluate.table(columns, held_tokens), task_items, said,
                    {"student after": (student, s_tok)}, write, note=teacher.note()), student


def train_student(s: Session, cfg, student, teacher, objective, train, held, vocab, tokens: Tokens):
    """The student (and the objective's own modules) trained: sharded over the processes under
    train.shard=fsdp (the teacher too with teacher.shard), else prepared by Accelerate; the
    loop; then gathered whole on the main process. -> (the trained student, the final
    comparison when every process had to take it together, else None)."""
    acc, tok = s.accelerator, tokens.data
    pad_id = tok.pad_token_id
    if cfg.train.qat != "none":
        from stillroom.deploy.quant import enable
        log.info("quantization-aware: %d linear weights trained through %s", enable(student, cfg.train.qat),
                 cfg.train.qat)
    if cfg.train.gradient_checkpointing:   # activations recomputed in the backward, layer by layer
        running.checkpoint_activations(student)
    fsdp = shard.active(cfg, acc)
    t_sharded = fsdp and cfg.teacher.shard and teacher.shardable
    if fsdp:   # each process keeps 1/N of the student, its gradients and its optimizer state
        shard.shard(student, precision=acc.mixed_precision)
        log.info("train.shard=fsdp: the student sharded over %d processes (FSDP2, per decoder layer%s)%s",
                 acc.num_processes, "; gathered in bf16, gradients reduced in fp32" if acc.mixed_precision == "bf16"
                 else "", ", and the teacher" if t_sharded else "")
    if t_sharded and not shard.is_sharded(teacher.model):   # a Distiller's teacher, given whole
        shard.shard(teacher.model, frozen=True)
    if cfg.train.shard == "fsdp" and not fsdp:
        log.info("train.shard=fsdp in one process: nothing to shard across (launch several with accelerate launch)")
    optimizer = make_optimizer(torch.nn.ModuleList([student, *objective.trained]), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    for m in objective.trained:
        # Not wrapped in DDP: it has no forward of its own for DDP to hook, so its gradients are
        # averaged over the processes once per step (loop.accumulate, with the student's) instead.
        s.place(m)
        if not fsdp:
            acc.register_for_checkpointing(m)
    if not fsdp:   # (a sharded run's checkpoints are its own: outputs.save_trainees)
        student, optimizer = acc.prepare(student, optimizer)
        acc.register_for_checkpointing(scheduler)
    source, e = teacher.eval_source(), cfg.eval

    def mid_eval(step):
        if not (s.main or fsdp):   # a sharded student's forward is taken by every process together
            return None
        cmp = evaluate.score(acc.unwrap_model(student), source, held, pad_id, e.batch_size, e.max_batches, vocab)
        if not s.main:
            return None
        return {**cmp, "step": step}, (f"held-out perplexity {cmp['student_perplexity']:.3f}, agreement "
                                       f"{cmp['agreement']:.1%}, KL {cmp['kl_per_token']:.4f}")

    s.fit(cfg, [Trainee(None, student, optimizer, scheduler, objective.trained)], objective,
          windows(train, cfg, acc, pad_id), evaluate=mid_eval, desc="distill")
    cmp = None
    if t_sharded:   # the comparison with a sharded teacher is taken by every process together
        cmp = evaluate.score(student, tokens.reference(source), held, pad_id, e.batch_size,
                             e.max_batches, vocab, tokenizer=tok)
    whole = shard.full_state(student) if fsdp else None   # every process takes part; the main one gets it
    if not s.main:
        acc.end_training()
        return acc.unwrap_model(student), None
    student = shard.unsharded(student, whole) if fsdp else acc.unwrap_model(student)
    if cfg.train.qat != "none":   # the evaluation after training and final/ see the quantized weights
        from stillroom.deploy.quant import bake
        bake(student)
    return student, cmp


def finetune_stage(cfg, out: Path, distilled: Path, resume: bool, progress: bool) -> dict:
    """Multi-stage: the distilled student fine-tuned on labelled data with CE alone, into
    <out>/finetune (its own checkpoints, metrics and final/). The teacher stays the reference in
    the table (a cross-tokenizer run compares with the distilled student instead: Tokens.stage_teacher)."""
    from stillroom.config import LossConfig, StudentConfig

    ft = cfg.finetune
    sub = cfg.model_copy(deep=True)
    sub.finetune = None
    sub.teacher = Tokens.stage_teacher(cfg, distilled)
    sub.student = StudentConfig(init="pretrained", model=str(distilled))
    sub.data = cfg.data.model_copy(update={"path": ft.data, "eval_path": None})
    sub.loss = LossConfig(alpha=0.0, lean=cfg.loss.lean, chunk_rows=cfg.loss.chunk_rows)
    sub.train = cfg.train.model_copy(update={"output_dir": str(out / "finetune"), "max_steps": ft.max_steps,
                                             "lr": ft.lr, "batch_size": ft.batch_size or cfg.train.batch_size,
                                             "warmup_steps": min(cfg.train.warmup_steps, ft.max_steps // 10)})
    log.info("stage 2: fine-tuning %s on %s for %d steps", distilled, ft.data, ft.max_steps)
    again = resume and bool(checkpoints(out / "finetune"))
    return distill(sub, overwrite=not again, resume=again, progress=progress)
