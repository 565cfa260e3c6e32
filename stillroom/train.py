"""The distillation loop, on Accelerate, top to bottom.

One optimizer step: take the step's micro-batches (a pure function of the step number, so resume is
exact) -> count their valid tokens across all processes, once -> for each micro-batch: teacher
logits (no autograd) -> student logits -> loss *sum* -> backward of sum * num_processes / num_tokens
(cancelling DDP's mean over processes) -> clip -> step. So 4 micro-batches x 1 process, 1 x 4 and
2 x 2 processes all produce the same gradient.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import evaluate, faults, methods, models
from .config import Config, to_yaml
from .data import collate, load_data, micro_batch, model_inputs
from .errors import Stopped, UserError
from .outputs import check_writable, checkpoints, prepare_output, read_state, save_checkpoint, trim_metrics, write_final  # noqa: F401
from .losses import IGNORE_INDEX, balance_scale, linear_mixed_loss, mixed_loss, scheduled, shift_labels

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
    return torch.optim.AdamW(groups, lr=lr or cfg.train.lr)


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
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # shifted: labels[i] is the target of logits[i]
    examples: list | None = None  # what the batch was made of (a cached teacher looks them up)
    position_ids: torch.Tensor | None = None  # packed examples: positions restart per document
    cached: object = None  # the cached teacher's TopK for this batch, when read ahead


def to_batch(examples, pad_id, device) -> Batch:
    b = collate(examples, pad_id)
    pos = b.get("position_ids")
    return Batch(b["input_ids"].to(device), b["attention_mask"].to(device),
                 shift_labels(b["labels"]).to(device), list(examples), None if pos is None else pos.to(device))


def teacher_targets(teacher, b: Batch, accelerator, width=None, lean=False):
    """The teacher's side of the loss for a batch: a cached TopK; or, live, its full logits (plain
    path) or its final hidden states and head (lean: the loss makes logits at labelled rows only)."""
    from .cache import TeacherCache
    from .losses import Head

    if isinstance(teacher, TeacherCache):
        if b.cached is not None:   # read ahead by the prefetch thread
            return b.cached
        return teacher.targets(b.examples, b.input_ids.shape[1], b.input_ids.device).top
    head = models.output_head(teacher, width, base=True) if lean else None
    with torch.inference_mode(), accelerator.autocast():
        if head is not None:
            return Head(models.base_hidden(teacher, **model_inputs(b)), *head)
        t = teacher(**model_inputs(b), use_cache=False).logits
    return t[..., :width] if width else t


def loss_weights(cfg, step: int) -> tuple[float, float]:
    """(alpha, temperature) at optimizer step `step` under loss.schedule."""
    lc, n = cfg.loss, cfg.train.max_steps
    return (scheduled(lc.alpha, lc.alpha_end, step, n, lc.schedule),
            scheduled(lc.temperature, lc.temperature_end, step, n, lc.schedule))


def accumulate(student, teacher, batches: list[Batch], cfg, accelerator, width=None, step=0, ctx=None) -> dict:
    """Forward + backward over one optimizer step's micro-batches; leaves the summed, correctly
    normalized gradient in student's .grad. Returns the step's loss per token and token counts.
    ctx (a methods.Context) carries what on-policy steps and the general path need."""
    terms = methods.step_terms(cfg, step)
    on_policy = methods.on_policy_step(cfg, step)
    if on_policy:   # GKD: the student writes the continuations; no CE on its own tokens
        if ctx is None:
            raise ValueError("on-policy steps need a methods.Context (pad and eos ids)")
        where = window_indices(step, cfg, accelerator.process_index, accelerator.num_processes)
        batches = methods.on_policy_batches(accelerator.unwrap_model(student), batches, cfg, ctx.pad_id,
                                            ctx.eos_id, where, to_batch, accelerator.device)
        terms = {k: v for k, v in terms.items() if k != "ce"}
    general = methods.is_general(cfg)
    if general and ctx is None:
        raise ValueError(f"loss {sorted(terms)} takes the general path, which needs a methods.Context")
    t_terms = methods.teacher_terms(terms)
    local = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)
    counts = torch.tensor([local, sum(int(b.attention_mask.sum()) for b in batches)],
                          device=accelerator.device, dtype=torch.float64)
    counts = accelerator.reduce(counts, "sum") if accelerator.num_processes > 1 else counts
    num_tokens = max(int(counts[0]), 1)
    scale = accelerator.num_processes / num_tokens
    loss_total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    lc = cfg.loss
    alpha, temperature = loss_weights(cfg, step)
    # The fast path: CE + one teacher term (a divergence or hard labels) of one teacher.
    (kd_name, kd_w), = ([("forward_kl", 0.0)] if general or not t_terms else list(t_terms.items()))
    kind, ce_w = ("hard" if kd_name == "hard" else "soft"), terms.get("ce", 0.0)
    s_head = models.output_head(student, width) if lc.lean and not general else None
    parts: dict = {}
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(student)
        with sync:
            if general:
                loss_sum = methods.general_step(student, ctx, b, cfg, terms, temperature, accelerator, parts)
            elif s_head is not None:   # lean: logits made inside the loss, at labelled rows only
                t = teacher_targets(teacher, b, accelerator, width, lean=True) if kd_w > 0 else None
                with accelerator.autocast():
                    hidden = models.final_hidden(student, **model_inputs(b))
                loss_sum = linear_mixed_loss(hidden, s_head[0], [(t, kd_w)] if kd_w else [], b.labels,
                                             ce_weight=ce_w, temperature=temperature, kind=kind,
                                             chunk=lc.chunk_rows, bias=s_head[1],
                                             divergence=kd_name if kind == "soft" else "forward_kl",
                                             beta=lc.beta)
            else:
                t = teacher_targets(teacher, b, accelerator, width) if kd_w > 0 else None
                with accelerator.autocast():
                    s_logits = student(**model_inputs(b), use_cache=False).logits
                if width:
                    s_logits = s_logits[..., :width]
                # inplace_grad: the logits' storage receives their gradient (they are not read again).
                loss_sum = mixed_loss(s_logits, [(t, kd_w)] if kd_w else [], b.labels, ce_weight=ce_w,
                                      temperature=temperature, kind=kind, chunk=lc.chunk_rows,
                                      inplace_grad=True, divergence=kd_name if kind == "soft" else "forward_kl",
                                      beta=lc.beta)
            accelerator.backward(loss_sum * scale)
        loss_total += loss_sum.detach()
    keys = sorted(set(terms) | ({"uld"} if lc.cross_tokenizer == "uld" else set()))
    raw = torch.tensor([parts.get(k, 0.0) for k in keys] + [float(loss_total)], dtype=torch.float64,
                       device=accelerator.device)
    if accelerator.num_processes > 1:
        raw = accelerator.reduce(raw, "sum")
    out = {"loss": float(raw[-1]) / num_tokens, "target_tokens": int(counts[0]),
           "tokens": int(counts[1]), "alpha": alpha, "temperature": temperature, "on_policy": on_policy,
           "weights": terms}
    if general:   # each term's raw (unweighted) size per target token
        out["terms"] = {k: float(v) / num_tokens for k, v in zip(keys, raw[:-1].tolist()) if k in parts}
    return out


class GracefulStop:
    """SIGINT / SIGTERM during training: finish the current step, save a checkpoint, stop (the
    decision is taken together by all processes at a step boundary, so it is never mid-update).
    A second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
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


def set_threads(cfg, accelerator):
    """torch's CPU threads for this process (see train.threads); -> the number set."""
    n = cfg.train.threads
    if not n and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = int(os.environ["OMP_NUM_THREADS"])
    if not n:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        n = max(1, (os.cpu_count() or 1) // max(1, local))
        n = min(n, torch.get_num_threads()) if local == 1 else n   # alone: torch's default (physical cores)
    torch.set_num_threads(n)
    return n


def make_accelerator(cfg, out: Path):
    from accelerate import Accelerator

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    for tracker in cfg.train.report_to:
        if tracker == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise UserError("train.report_to=[tensorboard] needs: pip install tensorboard") from None
    # cpu=True on a machine without CUDA: under `accelerate launch --multi_gpu --num_processes N`
    # that makes Accelerate use gloo (MULTI_CPU) instead of silently running N single processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp,
                              log_with=cfg.train.report_to or None, project_dir=str(out))
    set_threads(cfg, accelerator)
    return accelerator


def prefetched(make, steps, enabled=True):
    """Yield (step, make(step)) with make(step + 1) already running on a background thread, so the
    data work of the next step overlaps this one's compute. make must be a pure function of step."""
    from concurrent.futures import ThreadPoolExecutor

    steps = list(steps)
    if not enabled or not steps:
        yield from ((s, make(s)) for s in steps)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="stillroom-data") as pool:
        nxt = pool.submit(make, steps[0])
        for i, s in enumerate(steps):
            ready = nxt.result()
            nxt = pool.submit(make, steps[i + 1]) if i + 1 < len(steps) else None
            yield s, ready


def save_projections(proj, folder: Path):
    """The learned hidden-state projections beside the student: projections.safetensors (one
    (teacher width, student width) matrix per mapped layer) and the layer map they belong to."""
    from safetensors.torch import save_file
    save_file({f"proj.{k}": m.weight.detach().contiguous().cpu() for k, m in enumerate(proj.maps)},
              str(folder / "projections.safetensors"))
    (folder / "projections.json").write_text(json.dumps({"layer_map": proj.pairs}))


def update_balance(ema: dict, stats: dict, decay: float) -> dict:
    """Running means of the raw per-token CE and teacher terms (the KD side as its weights' mean),
    from the terms the step actually used (an on-policy step has no CE: it leaves them as they were)."""
    raw = stats.get("terms", {})
    kd_terms = methods.teacher_terms(stats["weights"])
    w = sum(kd_terms.values())
    if "ce" not in raw or not w:
        return ema
    kd = raw["uld"] if "uld" in raw else sum(kd_terms[k] * raw.get(k, 0.0) for k in kd_terms) / w
    mix = lambda old, x: x if old is None else decay * old + (1 - decay) * x  # noqa: E731
    return {"ce": mix(ema["ce"], raw["ce"]), "kd": mix(ema["kd"], kd)}


# ------------------------------------------------------------------------------------ the run

def default_data(cfg: Config, teacher: models.Loaded) -> str:
    """The embedded default: the teacher's answers to the bundled prompts, generated once."""
    import hashlib

    from .generate import LocalTeacher, generate_file, read_prompts

    g = cfg.generate
    prompts = read_prompts(g.prompts, g.num_prompts, g.prompt_field, g.split, g.system, g.dedup)
    key = hashlib.sha1(json.dumps([cfg.teacher.model, prompts, g.model_dump()], sort_keys=True)
                       .encode()).hexdigest()[:12]
    path = models.cache_dir() / "data" / f"answers-{key}.jsonl"
    log.info("data: the teacher's answers to %d prompts (%s)", len(prompts), path)
    generate_file(LocalTeacher(teacher.model, teacher.tokenizer, cfg.teacher.model), prompts, path, g)
    return str(path)


def prepare_data(cfg, teacher: models.Loaded, accelerator, tokenizer=None):
    """-> (cfg with data.path resolved, train examples, held-out examples). With no data.path the
    main process generates the embedded default data once and tells the others where it is.
    tokenizer: the one the data is read with (default the teacher's; a cross-tokenizer run reads
    it with the student's)."""
    if cfg.data.path is None:
        cfg = cfg.model_copy(deep=True)
        cfg.data.path = default_data(cfg, teacher) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            holder = [cfg.data.path]
            broadcast_object_list(holder)
            cfg.data.path = holder[0]
    train, held = load_data(cfg, tokenizer or teacher.tokenizer)
    if not held:
        held = train[: max(1, min(len(train), 8))]
        log.warning("no held-out examples (data.eval_fraction=0, no data.eval_path): "
                    "evaluating on training examples")
    return cfg, train, held


def check_context(cfg, teacher_config):
    ctx = getattr(teacher_config, "max_position_embeddings", None)
    if ctx and cfg.data.seq_len > ctx:
        raise UserError(f"data.seq_len={cfg.data.seq_len} is beyond the teacher's context of {ctx} tokens")


def eval_columns(student, student_path, teacher, held, cfg, width, pad_id, with_teacher=True, cache=None,
                 s_tok=None):
    """s_tok: the student's tokenizer when it differs from the teacher's (cross-tokenizer): the
    teacher is then timed on the same prompts in its own tokens, and perplexities, being per token
    of different tokenizers, are not compared (agreement and KL do not exist across vocabularies)."""
    e = cfg.eval
    cross = s_tok is not None
    cmp = evaluate.compare(student, None if cross else cache or teacher.model, held, pad_id, e.batch_size,
                           e.max_batches, width)
    prompts = evaluate.speed_prompts(held, e.gen_prompts)
    cols = {}
    if with_teacher and cross:
        t_prompts = [teacher.tokenizer(s_tok.decode(p), add_special_tokens=False)["input_ids"] for p in prompts]
        cols["teacher"] = evaluate.teacher_column(teacher.model, teacher.path, cmp, e, t_prompts,
                                                  teacher.tokenizer.pad_token_id)
    elif with_teacher and cache is not None:  # not loaded: no size or speed to measure
        cols["teacher"] = {"perplexity": cmp["teacher_perplexity"], "agreement": None, "kl_per_token": None,
                           "params": cache.index.get("teacher_params"), "size_mb": None, "gen_tokens_per_s": None}
    elif with_teacher:
        cols["teacher"] = evaluate.teacher_column(teacher.model, teacher.path, cmp, e, prompts, pad_id)
    cols["student"] = evaluate.student_column(student, student_path, cmp, e, prompts, pad_id)
    return cols, cmp["tokens"]


def check_methods(cfg):
    """Combinations of methods that cannot work, refused before anything is loaded."""
    lc, tc = cfg.loss, cfg.teacher
    terms = lc.terms or {("hard" if lc.kind == "hard" else lc.divergence): lc.alpha}
    cached = tc.kind == "cache" or any(m.kind == "cache" for m in tc.mix)
    if cached and lc.temperature_end not in (None, lc.temperature):
        raise UserError("loss.temperature_end: a top-k cache holds the teacher at one temperature; "
                        "schedule the temperature with a live teacher (alpha may still be scheduled)")
    full = [k for k, v in methods.teacher_terms(terms).items() if v and k not in ("forward_kl", "hard")]
    if cached and full and (lc.terms or lc.kind == "soft"):
        raise UserError(f"loss {full[0]} needs the teacher's full distribution; a top-k cache "
                        "(teacher.kind=cache) supports forward_kl and hard only: use a live teacher")
    feats = [k for k in terms if k in methods.FEATURE_TERMS and terms[k]]
    if feats and tc.kind == "cache":
        raise UserError(f"loss.terms.{feats[0]} needs the teacher's hidden states: use a live teacher")
    if lc.on_policy and cached:
        raise UserError("loss.on_policy: the teacher must score the student's own continuations, which no "
                        "cache holds: use live teachers")
    if lc.cross_tokenizer == "uld":
        if cached or tc.mix:
            raise UserError("loss.cross_tokenizer=uld works with one live teacher (no teacher.mix, no cache)")
        if feats:
            raise UserError("loss.cross_tokenizer=uld: hidden-state and attention terms need aligned "
                            "positions of one tokenizer; drop them")
        if lc.token_weight != "none":
            raise UserError("loss.token_weight is not supported with loss.cross_tokenizer=uld")
        if cfg.data.pack:
            raise UserError("loss.cross_tokenizer=uld re-tokenizes each example's text: set data.pack=false")
    ft = getattr(cfg, "finetune", None)
    if ft is not None and not Path(ft.data).exists() and (Path(ft.data).suffix or ft.data.count("/") != 1):
        raise UserError(f"finetune.data not found: {ft.data}")
    if lc.on_policy and (tc.route_field or cfg.data.pack):
        raise UserError("loss.on_policy rewrites each example from its prompt: not with teacher.route_field "
                        "or data.pack")


def load_teachers(cfg, primary, width, s_tok, accelerator) -> list:
    """The step's teachers: the primary (already loaded) and teacher.mix, weights normalized."""
    from .cache import TeacherCache

    tc = cfg.teacher
    specs = [(tc.name, primary, tc.weight, tc.offload)]
    for m in tc.mix:
        if m.kind == "cache":
            src = TeacherCache(m.cache)
            src.check(cfg, s_tok)
            if src.index["vocab_size"] > width:
                raise UserError(f"teacher.mix '{m.name}': its cached logits ({src.index['vocab_size']}) are wider "
                                f"than the student's ({width})")
        else:
            loaded = models.load(m.model)
            w, note = models.check_vocab(loaded.model, loaded.tokenizer, loaded.model, s_tok)
            if w < width:
                raise UserError(f"teacher.mix '{m.name}' ({m.model}) has {w} logits, fewer than the student's {width}")
            src = loaded.model
            dev = "cpu" if m.offload else accelerator.device
            src.to(dev, dtype=models.teacher_dtype(m.dtype, accelerator.device))
        specs.append((m.name, src, m.weight, m.offload))
    total = sum(w for _, _, w, _ in specs) or 1.0
    return [methods.Teacher(n, src, w / total, off) for n, src, w, off in specs]


def distill(cfg: Config, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    out = Path(cfg.train.output_dir)
    prepare_output(out, overwrite, resume)
    accelerator = make_accelerator(cfg, out)
    main = accelerator.is_main_process
    torch.manual_seed(cfg.train.seed)

    cache = None
    check_methods(cfg)
    if cfg.teacher.kind == "cache":
        from .cache import TeacherCache
        cache = TeacherCache(cfg.teacher.cache)
        teacher = models.Loaded(None, cache.tokenizer(), cache.index["teacher"], None, cache.teacher_config())
        if cfg.data.path is None:  # the data the cache was built from
            cfg = cfg.model_copy(deep=True)
            cfg.data.path = cache.index["data"]["path"]
            cfg.data.eval_path = cache.index["data"]["eval_path"]
    else:
        teacher = models.load(cfg.teacher.model)
    student, s_tok, how = models.build_student(cfg.student, teacher, cfg.train.seed)
    cross = cfg.loss.cross_tokenizer == "uld"
    t_width = cache.index["vocab_size"] if cache else teacher.model
    if cross:
        width, note = None, None
        if s_tok.get_vocab() == teacher.tokenizer.get_vocab():
            log.warning("loss.cross_tokenizer=uld with a teacher of the student's own tokenizer: the usual "
                        "loss (cross_tokenizer=none) is exact where ULD is an approximation")
    else:
        try:
            width, note = models.check_vocab(t_width, teacher.tokenizer, student, s_tok)
        except UserError as e:
            raise UserError(f"{e} (or set loss.cross_tokenizer=uld to distill across tokenizers)") from None
    if note:
        log.warning(note)
    if cache and width < cache.index["vocab_size"]:
        raise UserError(f"the cached teacher's logits ({cache.index['vocab_size']}) are wider than the "
                        f"student's ({width}): its top-k ids may not exist in the student")
    check_context(cfg, teacher.model_config())
    if cache:
        cache.check(cfg, s_tok)  # tokenizer, seq_len, temperature: before reading any data
    if cfg.loss.alpha == 0:
        log.info("loss.alpha=0: plain CE on the data (sequence-level KD when the data is teacher output)")
    tok = s_tok if cross else teacher.tokenizer
    cfg, train, held = prepare_data(cfg, teacher, accelerator, tok)
    if cfg.student.prune_heads or cfg.student.prune_intermediate:
        from .prune import calibrate_and_prune
        student, pruned = calibrate_and_prune(student, train, tok.pad_token_id, cfg.student)
        how = f"{how}, {pruned}"
    if cache:
        cache.check(cfg, s_tok, {"training": train, "held-out": held})
    if len(train) < cfg.train.batch_size:
        log.warning("only %d training examples for train.batch_size=%d", len(train), cfg.train.batch_size)

    pad_id = tok.pad_token_id
    ctx = methods.Context(load_teachers(cfg, cache or teacher.model, width, s_tok, accelerator), width=width,
                          pad_id=pad_id, eos_id=tok.eos_token_id)
    if cross:
        ctx.s_tok, ctx.t_tok = s_tok, teacher.tokenizer
        ctx.match = tuple(x.to(accelerator.device) for x in methods.vocab_match(s_tok, teacher.tokenizer))
        log.info("cross-tokenizer: %d tokens spelled the same in both vocabularies (exact-match term)",
                 len(ctx.match[0]))
    terms0 = methods.step_terms(cfg, 0)
    feats = [k for k in terms0 if k in methods.FEATURE_TERMS]
    if feats:
        t_cfg, s_cfg = teacher.model.config, student.config
        kept = None
        if cfg.student.init == "from_teacher" and not cfg.student.model:
            kept = cfg.student.layers or models.spread_layers(t_cfg.num_hidden_layers,
                                                              cfg.student.num_layers or t_cfg.num_hidden_layers)
        ctx.pairs = methods.layer_map(cfg, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, kept)
        ctx.proj = methods.Projections(ctx.pairs, s_cfg.hidden_size, t_cfg.hidden_size)
        if "attention" in feats:
            methods.use_eager_attention(student)
            methods.use_eager_attention(teacher.model)
        log.info("intermediate layers (student, teacher): %s", ctx.pairs)
    # Everything is validated: from here on the output folder is written.
    if main:
        if overwrite and not resume:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    n_params = models.num_params(student)
    t_params = cache.index.get("teacher_params") if cache else models.num_params(teacher.model)
    log.info("teacher %s%s: %s params; student (%s): %s params; %d train / %d held-out examples",
             teacher.source, f" (cached top-{cache.top_k} in {cfg.teacher.cache})" if cache else "",
             f"{t_params:,}" if t_params else "?", how, f"{n_params:,}", len(train), len(held))

    if cache is None:
        teacher.model.to("cpu" if cfg.teacher.offload else accelerator.device,
                         dtype=models.teacher_dtype(cfg.teacher.dtype, accelerator.device))
    source = cache or teacher.model   # what the loss and the eval read the teacher from
    before, held_tokens = (eval_columns(student, None, teacher, held, cfg, width, pad_id, cache=cache,
                                        s_tok=s_tok if cross else None) if main else ({}, 0))
    if cfg.train.qat != "none":
        from .quant import enable
        log.info("quantization-aware: %d linear weights trained through %s", enable(student, cfg.train.qat),
                 cfg.train.qat)
    trained = torch.nn.ModuleList([student] + ([ctx.proj] if ctx.proj is not None else []))
    optimizer = make_optimizer(trained, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if ctx.proj is not None:
        # Not wrapped in DDP: it has no forward of its own for DDP to hook, so its gradients are
        # averaged over the processes once per step (methods.sync_grads) instead.
        ctx.proj.to(accelerator.device)
        accelerator.register_for_checkpointing(ctx.proj)
    student, optimizer = accelerator.prepare(student, optimizer)
    params = lambda: [*student.parameters(), *(ctx.proj.parameters() if ctx.proj is not None else [])]  # noqa: E731
    accelerator.register_for_checkpointing(scheduler)
    start, bad_steps = 0, 0
    ema = {"ce": None, "kd": None}
    if resume:
        last = checkpoints(out)[-1]
        accelerator.load_state(str(last))
        state = read_state(last)
        start, bad_steps = state["step"], state.get("bad_steps", 0)
        ema = state.get("balance", ema)
        if main:
            trim_metrics(out / "metrics.jsonl", start)
        log.info("resumed from %s (step %d)", last, start)
    if cfg.train.report_to:
        accelerator.init_trackers("stillroom", config=cfg.model_dump())

    metrics_file = open(out / "metrics.jsonl", "a") if main else None
    bar = tqdm(total=cfg.train.max_steps, initial=start, desc="distill", unit="step",
               disable=not (progress and main))
    t_start, tokens_seen, last_log = time.perf_counter(), 0, {}
    student.train()

    def make_batches(step):
        bs = [to_batch(mb, pad_id, accelerator.device)
              for mb in window(train, step, cfg, accelerator.process_index, accelerator.num_processes)]
        if cache is not None and methods.teacher_terms(methods.step_terms(cfg, step)):
            for b in bs:
                b.cached = cache.targets(b.examples, b.input_ids.shape[1], b.input_ids.device).top
        faults.point("batch")   # on the prefetch thread, while the previous step computes
        return bs

    done, saved = start, start if resume else None
    save = lambda at: save_checkpoint(accelerator, out, at, cfg.train.keep_checkpoints,  # noqa: E731
                                      state={"bad_steps": bad_steps, "balance": ema})
    try:
        with GracefulStop() as stop:
            for step, batches in prefetched(make_batches, range(start, cfg.train.max_steps), cfg.train.prefetch):
                if cfg.loss.balance:
                    ctx.kd_scale = balance_scale(ema["ce"], ema["kd"])
                stats = accumulate(student, source, batches, cfg, accelerator, width, step=step, ctx=ctx)
                if ctx.proj is not None:
                    methods.sync_grads(ctx.proj, accelerator)
                # The norm is taken even without clipping: a non-finite one means a bad step.
                grad_norm = float(accelerator.clip_grad_norm_(params(), cfg.train.max_grad_norm or float("inf")))
                good = math.isfinite(stats["loss"]) and math.isfinite(grad_norm)
                if good and cfg.loss.balance:
                    ema = update_balance(ema, stats, cfg.loss.balance_decay)
                if good:
                    optimizer.step()
                else:
                    bad_steps += 1
                    log.warning("step %d: non-finite %s: step skipped (%d so far, train.max_bad_steps=%d)",
                                step + 1, "loss" if not math.isfinite(stats["loss"]) else "gradient",
                                bad_steps, cfg.train.max_bad_steps)
                    if bad_steps > cfg.train.max_bad_steps:
                        have = checkpoints(out)
                        raise UserError(
                            f"stopping at step {step + 1}: {bad_steps} steps had a non-finite loss or gradient "
                            f"(more than train.max_bad_steps={cfg.train.max_bad_steps}); lower train.lr or check "
                            "the data" + (f"; the last checkpoint is {have[-1]}" if have else ""))
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                faults.point("step")
                tokens_seen += stats["tokens"]
                elapsed = time.perf_counter() - t_start
                record = {"step": done, "loss": round(stats["loss"], 5), "lr": scheduler.get_last_lr()[0],
                          "grad_norm": grad_norm if math.isfinite(grad_norm) else str(grad_norm),
                          "tokens_per_s": round(tokens_seen / elapsed, 1), "elapsed_s": round(elapsed, 1),
                          "bad_steps": bad_steps, "alpha": round(stats["alpha"], 6),
                          "temperature": round(stats["temperature"], 6)}
                if "terms" in stats:
                    record["terms"] = {k: round(v, 6) for k, v in stats["terms"].items()}
                if cfg.loss.balance:
                    record["kd_scale"] = round(ctx.kd_scale, 6)
                if cfg.loss.on_policy:
                    record["on_policy"] = stats["on_policy"]
                if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
                    last_log = record
                    if main:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        faults.point("metrics")
                    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                    step=done)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if (cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.max_steps
                        and main):
                    cmp = evaluate.compare(accelerator.unwrap_model(student), source, held, pad_id,
                                           cfg.eval.batch_size, cfg.eval.max_batches, width)
                    faults.point("eval")
                    cmp["step"] = done
                    metrics_file.write(json.dumps({"eval": cmp}) + "\n")
                    metrics_file.flush()
                    bar.write(f"step {done}: held-out perplexity {cmp['student_perplexity']:.3f}, "
                              f"agreement {cmp['agreement']:.1%}, KL {cmp['kl_per_token']:.4f}")
                if cfg.train.save_every and done % cfg.train.save_every == 0:
                    save(done)
                    saved = done
                if stop.requested(accelerator):
                    if saved != done:
                        save(done)
                    raise stop.stopped(done, out)
    except (UserError, Stopped, KeyboardInterrupt):
        raise
    except Exception as e:
        # A failure mid-step (a teacher that breaks, out of memory...): the weights and optimizer
        # are those of the last completed step; keep them, then stop with one line.
        import traceback
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
    accelerator.end_training()
    if not main:
        return {}
    metrics_file.close()

    student = accelerator.unwrap_model(student)
    if cfg.train.qat != "none":   # the evaluation below and final/ see the quantized weights
        from .quant import bake
        bake(student)
    after, _ = eval_columns(student, None, teacher, held, cfg, width, pad_id, with_teacher=False, cache=cache,
                            s_tok=s_tok if cross else None)
    columns = {"teacher": before["teacher"], "student before": before["student"],
               "student after": after["student"]}
    metrics = {"eval": columns, "held_out_tokens": held_tokens, "train": last_log,
               "train_examples": len(train), "held_out_examples": len(held)}
    final = write_final(out, student, s_tok, cfg, metrics,
                        teacher.model.generation_config if teacher.model is not None and not cross else None,
                        extra=None if ctx.proj is None else lambda d: save_projections(accelerator.unwrap_model(ctx.proj), d))
    metrics["table"] = evaluate.table(columns, held_tokens)
    if cache:
        kl = ("KL is over its top-k + one tail bucket, a lower bound of the full KL" if cache.temperature == 1.0
              else f"no KL at T=1 from a cache at T={cache.temperature}")
        metrics["table"] += f"\n(teacher read from the top-{cache.top_k} cache {cfg.teacher.cache}: {kl})"
    metrics["final"] = str(final)
    from .report import write as write_report
    metrics["report"] = str(write_report(out))
    if cfg.finetune is not None:
        metrics["finetune"] = finetune_stage(cfg, out, final, resume, progress)
        metrics["table"] += ("\n\nstage 2: fine-tuned on " + cfg.finetune.data + " (CE only)\n"
                             + metrics["finetune"]["table"])
    return metrics


def finetune_stage(cfg, out: Path, distilled: Path, resume: bool, progress: bool) -> dict:
    """Multi-stage: the distilled student fine-tuned on labelled data with CE alone, into
    <out>/finetune (its own checkpoints, metrics and final/). The teacher stays the reference in
    the table (a cross-tokenizer run compares with the distilled student instead)."""
    from .config import LossConfig, StudentConfig

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
