"""What a training step minimizes: one object per way of computing the loss of a micro-batch.

An objective owns its setup (what it trains beside the student), its batch transform, its loss on
one micro-batch (a *sum* over target tokens, plus the raw sums of the terms it logs) and its state
for checkpoints. The loop (`run/loop.py`) only calls these:

    plan(step)                  -> Plan: the step's term weights, temperature, ...
    read_ahead(batches, plan)   on the data thread: a cached teacher's rows
    prepare(batches, plan, step)-> the step's batches (on-policy: the student's rollouts)
    losses(models, b, plan)     -> per trainee: (its name, loss sum, {term: raw sum}); one
                                   student here: loss(student, b, plan)
    scaled(loss, b, counts, n)  -> what the loop backwards (the normalization)
    after_step(plan, stats)     after a good optimizer step (balancing's running means)
    record(plan, stats, ...)    -> the step's log record (log(plan): this objective's fields)
    trained, state_dict / load_state_dict, save(folder)

Co-distillation's objectives (several trainees) are in objectives/peers.py.

The objectives: `Hybrid` (CE + one teacher term of one teacher: the fast closed-form kernel, lean
or plain chosen inside), `Terms` (any weighted list of terms over a mixture of teachers, per-token
weights), `Features` (Terms plus hidden-state / attention terms through learned projections) and
`CrossTokenizer` (ULD + exact-match KL on aligned positions); `OnPolicy` and `Balanced` wrap any of
them. `build_objective` is the one place that picks an objective; every loss weight it and the
objectives read comes from `LossConfig.spec` (config.py), the one loss spec inside.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from stillroom.data.examples import model_inputs
from stillroom.errors import UserError
from stillroom.losses import IGNORE_INDEX, Head, Mixture, distill_loss, fused, kernel_fits, uld_loss
from stillroom.models import core as models
from stillroom.models import running
from stillroom.objectives import methods
from stillroom.objectives.rules import FEATURE_TERMS, teacher_terms
from stillroom.teachers.core import route_weights

log = logging.getLogger("stillroom")


def balance_scale(ema_ce: float | None, ema_kd: float | None, limit: float = 1e4) -> float:
    """The factor on the teacher terms that brings their raw per-token size to the CE term's, so the
    configured weights mean what they say (easydistill#34: a KD term 1000x smaller than CE made
    alpha meaningless). From running means of past steps; 1 before any is known. Clamped."""
    if not ema_ce or not ema_kd or ema_kd <= 0 or ema_ce <= 0:
        return 1.0
    return float(min(max(ema_ce / ema_kd, 1.0 / limit), limit))


@dataclass
class Plan:
    """What one optimizer step computes: decided before its batches are read."""
    step: int
    terms: dict
    alpha: float
    temperature: float
    on_policy: bool = False
    kd_scale: float = 1.0


class Objective:
    """The interface, and what every objective shares: the plan of a step from the loss config."""
    trained: list = []     # modules trained beside the student (their parameters join the optimizer)

    def __init__(self, cfg, teachers: list, vocab: int | None):
        self.cfg, self.lc = cfg, cfg.loss
        self.teachers, self.vocab = teachers, vocab

    def plan(self, step: int) -> Plan:
        n = self.cfg.train.max_steps
        return Plan(step, self.lc.spec(step, n), *self.lc.weights(step, n))

    def prepare(self, batches, plan: Plan, step):
        """The step's batches before its losses (a loop.Failure where this process's data failed:
        passed on); step: a loop.Step (its number, the unwrapped models, the micro-batch indices)."""
        return batches

    def read_ahead(self, batches, plan: Plan):
        """Cached teachers' rows, read while the previous step computes."""
        if teacher_terms(plan.terms):
            for t in self.teachers:
                for b in batches:
                    t.read_ahead(b)

    def loss(self, student, b, plan: Plan, accelerator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def losses(self, models: dict, b, plan: Plan, accelerator):
        """One student: the loop's trainee None."""
        yield None, *self.loss(models[None], b, plan, accelerator)

    def scaled(self, loss_sum, b, counts, world: int):
        """The step's loss is its sum over all micro-batches and processes divided once by their
        target tokens (counts[0]); times the processes, as their gradients are averaged."""
        return loss_sum * (world / max(int(counts[0]), 1))

    def part_keys(self, plan: Plan) -> list[str]:
        """The raw terms the loss may report (summed over micro-batches and processes)."""
        return []

    def after_step(self, plan: Plan, stats: dict):
        pass

    def log(self, plan: Plan) -> dict:
        return {"alpha": round(plan.alpha, 6), "temperature": round(plan.temperature, 6)}

    def record(self, plan: Plan, stats: dict, norms: list, lrs: list, accelerator) -> dict:
        norm = norms[0]
        fields = {"loss": round(stats["loss"], 5), "lr": lrs[0],
                  "grad_norm": norm if math.isfinite(norm) else str(norm), **self.log(plan)}
        if "terms" in stats:
            fields["terms"] = {k: round(v, 6) for k, v in stats["terms"].items()}
        return fields

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass

    def save(self, folder: Path):
        """Files it adds to final/ (the learned projections)."""


class Hybrid(Objective):
    """CE + one teacher term (a divergence or hard labels) of one teacher: the closed-form chunked
    kernel. Lean (the default): logits made inside the loss from both models' final hidden states,
    at labelled rows only; plain: on full logits (models that soft-cap their logits)."""

    def __init__(self, cfg, teachers, vocab):
        super().__init__(cfg, teachers, vocab)
        self.lean = cfg.loss.lean

    def loss(self, student, b, plan, accelerator):
        lc, terms = self.lc, plan.terms
        w = sum(v for n, v in terms.items() if n != "ce")
        how = dict(temperature=plan.temperature, beta=lc.beta, chunk=lc.chunk_rows)
        s_head = running.output_head(student, self.vocab) if self.lean else None
        if s_head is not None:
            t = self.teachers[0].targets(b, "head") if w > 0 else None
            with accelerator.autocast():
                hidden = running.final_hidden(student, **model_inputs(b))
                # the head's matmuls in the dtype autocast runs the model's own (on the plain path):
                # read from autocast itself, not from the process-wide Accelerate state, which another
                # Accelerator in the process (a second trainer) can reset under this one
                kind = hidden.device.type
                dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
            s_head = running.output_head(student, self.vocab)   # after the forward: a sharded model's head is whole then
            compiled = fused.wanted(lc.compile, s_head[0].shape[0], hidden.device)
            return distill_loss(Head(hidden, *s_head), t, b.targets, terms, dtype=dtype, compiled=compiled,
                                **how), {}
        t = self.teachers[0].targets(b, "logits") if w > 0 else None
        with accelerator.autocast():
            s_logits = student(**model_inputs(b), use_cache=False).logits
        if self.vocab:
            s_logits = s_logits[..., :self.vocab]
        # inplace_grad: the logits' storage receives their gradient (they are not read again).
        compiled = fused.wanted(lc.compile, s_logits.shape[-1], s_logits.device)
        return distill_loss(s_logits, t, b.targets, terms, inplace_grad=True, compiled=compiled, **how), {}


class Terms(Objective):
    """Any weighted list of CE, hard and divergence terms against the mixture of the teachers'
    distributions (or per-example routing), with per-token weights: `losses.distill_loss` on the
    student's full logits, chunked; each term's raw sum is logged."""

    def student_out(self, student, b, accelerator, hidden=False, attention=False):
        with accelerator.autocast():
            out = student(**model_inputs(b), use_cache=False, output_hidden_states=hidden,
                          output_attentions=attention)
        return out, (out.logits[..., :self.vocab] if self.vocab else out.logits)

    def part_keys(self, plan):
        return sorted(plan.terms)

    def terms_loss(self, s_logits, b, plan, device, parts, primary_ready=None):
        """The loss over the mixture, with each term's raw sum; `primary_ready`: the primary teacher's logits when
        already computed (by the hidden-state forward), else its rows read ahead from a cache."""
        lc = self.lc
        targets = []
        if teacher_terms(plan.terms):
            ready = [primary_ready] + [None] * (len(self.teachers) - 1)
            for t, w, r in zip(self.teachers, route_weights(self.teachers, b, device), ready):
                if w is None or (not torch.is_tensor(w) and w <= 0):
                    continue
                r = t.targets(b, "logits", clone=True) if r is None else \
                    (r[..., :self.vocab] if self.vocab else r).clone()
                targets.append((r, w))
        terms = {k: v for k, v in plan.terms.items() if k not in FEATURE_TERMS}
        return distill_loss(s_logits, [(Mixture(targets), 1.0)] if targets else [], b.targets, terms,
                            plan.temperature, beta=lc.beta, token_weight=lc.token_weight, kd_scale=plan.kd_scale,
                            parts=parts, chunk=lc.chunk_rows)

    def loss(self, student, b, plan, accelerator):
        parts = {}
        _, s_logits = self.student_out(student, b, accelerator)
        return self.terms_loss(s_logits, b, plan, accelerator.device, parts), parts


class Features(Terms):
    """Terms plus hidden-state (cosine, MSE) and attention-transfer terms between mapped layers,
    through learned projections (student width -> teacher width) trained with the student and
    saved beside it. The primary teacher's forward gives both its hidden states and its logits."""

    def __init__(self, cfg, teachers, vocab, student, teacher_model, kept_layers):
        super().__init__(cfg, teachers, vocab)
        t_cfg, s_cfg = teacher_model.config, student.config
        self.pairs = methods.layer_map(cfg, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, kept_layers)
        self.proj = methods.Projections(self.pairs, s_cfg.hidden_size, t_cfg.hidden_size)
        self.trained = [self.proj]
        if "attention" in cfg.loss.spec():
            methods.use_eager_attention(student)
            methods.use_eager_attention(teacher_model)
        log.info("intermediate layers (student, teacher): %s", self.pairs)

    def loss(self, student, b, plan, accelerator):
        parts = {}
        feats = {k: v for k, v in plan.terms.items() if k in FEATURE_TERMS}
        att = "attention" in feats
        s_out, s_logits = self.student_out(student, b, accelerator, hidden=True, attention=att)
        t_out = self.teachers[0].targets(b, "features", attention=att)
        mask = b.targets != IGNORE_INDEX
        total = methods.feature_loss(feats, s_out, t_out, self.proj, self.pairs, mask, parts)
        return total + self.terms_loss(s_logits, b, plan, accelerator.device, parts, t_out.logits), parts

    def save(self, folder: Path):
        """projections.safetensors (one (teacher width, student width) matrix per mapped layer) and
        the layer map they belong to."""
        from safetensors.torch import save_file
        save_file({f"proj.{k}": m.weight.detach().contiguous().cpu() for k, m in enumerate(self.proj.maps)},
                  str(folder / "projections.safetensors"))
        (folder / "projections.json").write_text(json.dumps({"layer_map": self.proj.pairs}))


class CrossTokenizer(Terms):
    """A teacher of another tokenizer: each example's text re-tokenized for it, positions aligned
    where both have read the same characters; ULD (sorted-probability L1) plus match_weight x KL
    over the tokens both vocabularies spell the same, and CE on the student's own labels."""

    def __init__(self, cfg, teachers, s_tok, t_tok, device):
        super().__init__(cfg, teachers, None)
        self.s_tok, self.t_tok = s_tok, t_tok
        self.match = tuple(x.to(device) for x in methods.vocab_match(s_tok, t_tok))
        log.info("cross-tokenizer: %d tokens spelled the same in both vocabularies (exact-match term)",
                 len(self.match[0]))

    def part_keys(self, plan):
        return sorted(set(plan.terms) | {"uld"})

    def loss(self, student, b, plan, accelerator):
        parts = {}
        _, s_logits = self.student_out(student, b, accelerator)
        ce = distill_loss(s_logits, [], b.targets, {"ce": plan.terms.get("ce", 0.0)}, parts=parts)
        al = methods.align(b.examples, b.targets, self.s_tok, self.t_tok, b.input_ids.device)
        kd_w = sum(teacher_terms(plan.terms).values())
        total = 0.0
        if kd_w and al.s_rows.numel():
            t_logits = self.teachers[0].logits_of(al.input_ids, al.attention_mask)
            t_rows = t_logits.reshape(-1, t_logits.shape[-1]).index_select(0, al.t_rows).clone()
            s_rows = s_logits.reshape(-1, s_logits.shape[-1]).index_select(0, al.s_rows)
            kd = uld_loss(s_rows, t_rows, plan.temperature, self.match, self.lc.match_weight)
            parts["uld"] = parts.get("uld", 0.0) + float(kd.detach())
            total = plan.kd_scale * kd_w * kd
        return total + ce, parts


class Wrapper:
    """An objective around another: everything it does not change (its methods, and attributes
    such as `trained`, `teachers`, `vocab`), the inner one does. Not an Objective subclass, so no
    base-class default can shadow the inner objective's."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name == "inner":   # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def record(self, plan, stats, norms, lrs, accelerator):   # with this wrapper's log fields
        return Objective.record(self, plan, stats, norms, lrs, accelerator)


class OnPolicy(Wrapper):
    """GKD: on a fraction loss.on_policy of steps (chosen by seed and step, so resume is exact) the
    student writes the continuations of its examples' prompts and is taught on them; no CE there."""

    def __init__(self, inner, cfg, pad_id: int, eos_id):
        super().__init__(inner)
        self.cfg, self.pad_id, self.eos_id = cfg, pad_id, eos_id

    def plan(self, step):
        p = self.inner.plan(step)
        if not methods.on_policy_step(self.cfg, step):
            return p
        return replace(p, on_policy=True, terms={k: v for k, v in p.terms.items() if k != "ce"})

    def prepare(self, batches, plan, step):
        if plan.on_policy and isinstance(batches, list):
            batches = methods.on_policy_batches(step.models[None], batches, self.cfg, self.pad_id, self.eos_id,
                                                step.indices, batches[0].input_ids.device)
        return self.inner.prepare(batches, plan, step)

    def log(self, plan):
        return {**self.inner.log(plan), "on_policy": plan.on_policy}


class Balanced(Wrapper):
    """The teacher terms scaled by the running ratio of the raw CE and KD sizes, so their weights
    set their actual shares (easydistill#34: a KD term 1000x smaller than CE made alpha mean
    nothing). The running means are the objective's state, kept in checkpoints."""

    def __init__(self, inner: Objective, decay: float):
        super().__init__(inner)
        self.decay, self.ema = decay, {"ce": None, "kd": None}

    def plan(self, step):
        return replace(self.inner.plan(step), kd_scale=balance_scale(self.ema["ce"], self.ema["kd"]))

    def after_step(self, plan, stats):
        """Running means of the raw per-token CE and teacher terms (the KD side as its weights'
        mean), from the terms the step used (an on-policy step has no CE: it leaves them as they were)."""
        self.inner.after_step(plan, stats)
        raw = stats.get("terms", {})
        kd_terms = teacher_terms(plan.terms)
        w = sum(kd_terms.values())
        if "ce" not in raw or not w:
            return
        kd = raw["uld"] if "uld" in raw else sum(kd_terms[k] * raw.get(k, 0.0) for k in kd_terms) / w
        mix = lambda old, x: x if old is None else self.decay * old + (1 - self.decay) * x  # noqa: E731
        self.ema = {"ce": mix(self.ema["ce"], raw["ce"]), "kd": mix(self.ema["kd"], kd)}

    def log(self, plan):
        return {**self.inner.log(plan), "kd_scale": round(plan.kd_scale, 6)}

    def state_dict(self):
        return {**self.inner.state_dict(), "balance": dict(self.ema)}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
        self.ema = state.get("balance", self.ema)


def across_tokenizers(cfg) -> bool:
    """Does the objective distill across tokenizers (loss.cross_tokenizer=uld)? Then the data is
    read with the student's tokenizer, logits share no width, and the evaluation measures each
    model in its own tokens."""
    return cfg.loss.cross_tokenizer == "uld"


class Tokens:
    """How a run reads its data and measures its models across the two tokenizers: the objective's
    answer (a cross-tokenizer objective reads with the student's tokenizer and measures each model
    in its own tokens), so the run code asks instead of branching."""

    def __init__(self, cfg, s_tok, t_tok):
        cross = across_tokenizers(cfg)
        self.data = s_tok if cross else t_tok          # the tokenizer the run's data is read with
        self.teacher_own = t_tok if cross else None    # the teacher's own tokens in the evaluation, or None

    def reference(self, source):
        """What the student is compared with token by token: the teacher's eval source, or None
        across tokenizers (no shared tokens to compare)."""
        return source if self.teacher_own is None else None

    @staticmethod
    def stage_teacher(cfg, distilled):
        """The teacher config of a later stage (the fine-tune after distillation), which compares the
        student with it token by token: the run's teacher, or across tokenizers the distilled student
        itself (the only reference that reads the student's tokens)."""
        if across_tokenizers(cfg):
            return type(cfg.teacher)(model=str(distilled))
        return type(cfg.teacher)(model=cfg.teacher.model, dtype=cfg.teacher.dtype)


def shared_width(cfg, teacher, t_tok, student, s_tok) -> int | None:
    """The logit width the student and the teacher (`teacher`: its width() answer) share, its
    notes logged; None across tokenizers. Differing tokenizers are refused with the way out."""
    if across_tokenizers(cfg):
        if models.same_tokenizer(s_tok, t_tok):
            log.warning("loss.cross_tokenizer=uld with a teacher of the student's own tokenizer: the usual "
                        "loss (cross_tokenizer=none) is exact where ULD is an approximation")
        return None
    try:
        vocab, note = models.check_vocab(teacher, t_tok, student, s_tok)
    except UserError as e:
        raise UserError(f"{e} (or set loss.cross_tokenizer=uld to distill across tokenizers)") from None
    if note:
        log.warning(note)
    return vocab


def build_objective(cfg, teachers: list, vocab: int | None, *, student=None, teacher_model=None,
                    kept_layers=None, s_tok=None, t_tok=None, pad_id: int = 0, eos_id=None,
                    device="cpu") -> Objective:
    """The objective the loss config asks for (the one place that reads it)."""
    lc = cfg.loss
    if lc.cross_tokenizer == "uld":
        obj = CrossTokenizer(cfg, teachers, s_tok, t_tok, device)
    elif set(lc.spec()) & set(FEATURE_TERMS):
        obj = Features(cfg, teachers, vocab, student, teacher_model, kept_layers)
    # loss.terms as written: a term it names at weight 0 still asks for the general engine
    elif not kernel_fits(lc.terms or lc.spec(), mixture=bool(cfg.teacher.mix or cfg.teacher.route_field),
                         token_weight=lc.token_weight, balanced=lc.balance):
        obj = Terms(cfg, teachers, vocab)   # the loss takes its general engine: each term's raw sum is logged
    else:
        obj = Hybrid(cfg, teachers, vocab)
    if lc.on_policy:
        obj = OnPolicy(obj, cfg, pad_id, eos_id)
    if lc.balance:
        obj = Balanced(obj, lc.balance_decay)
    return obj


__all__ = ["Plan", "Objective", "Hybrid", "Terms", "Features", "CrossTokenizer", "OnPolicy", "Balanced",
           "build_objective", "Tokens", "teacher_terms",
           "balance_scale"]
