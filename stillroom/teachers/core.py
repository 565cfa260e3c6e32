"""Where the teacher side of the loss comes from, behind one interface (DistillKit's "a signal
source is online or offline"): a teacher turns a batch into targets, and the loss never asks
which kind it holds.

    teacher.targets(batch, need) -> logits (B, S, V) | TopK | Head | the model's output

need:
  "logits"    full logits, sliced to the student's vocabulary;
  "head"      the lean path: final hidden states and the output head (the loss makes logits at
              labelled rows only); a model whose logits are not a linear head gives logits;
  "features"  the model's output with hidden states (and attention maps with attention=True).
A cached teacher always answers with its top-k (a `TopK`): what it holds.

Kinds: `LiveTeacher` (a frozen model in its run dtype, its layers optionally in host memory between
uses) and `CachedTeacher` (a `stillroom cache` folder, read ahead on the data thread). Several
teachers make a mixture (`teacher.mix`): a list of them with normalized weights, or per-example
routing (`route_weights`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from stillroom.data.examples import model_inputs
from stillroom.errors import UserError
from stillroom.losses import Head
from stillroom.models import core as models
from stillroom.models import running


@dataclass
class LiveTeacher:
    """A frozen model. Its forward runs in inference mode under the run's autocast; `vocab`: the
    shared logit width when the student's differs (padded vocabularies), else None."""
    model: torch.nn.Module
    name: str = "teacher"
    weight: float = 1.0
    vocab: int | None = None
    autocast: object = contextlib.nullcontext
    path: str | None = None   # where it was loaded from (its size on disk in the table)
    cached = False
    shardable = True   # train.shard=fsdp with teacher.shard: its model is sharded with the student

    def _mode(self):
        """Inference mode, or no_grad for a sharded teacher: FSDP2 gathers its layers into buffers
        that the evaluation's (no_grad) forward writes too, and an inference tensor refuses that."""
        from stillroom.run.shard import is_sharded
        return torch.no_grad() if is_sharded(self.model) else torch.inference_mode()

    def _slice(self, logits):
        return logits[..., :self.vocab] if self.vocab else logits

    def targets(self, b, need: str = "logits", attention: bool = False, clone: bool = False):
        """clone=True: a copy that may enter autograd expressions (inference tensors cannot)."""
        m = self.model   # (on the batch's device; an offloaded one brings each layer there itself)
        with self._mode(), self.autocast():
            if need == "head":
                head = running.output_head(m, self.vocab, base=True)
                if head is not None:
                    return Head(running.base_hidden(m, **model_inputs(b)), *head)
            if need == "features":
                out = m(**model_inputs(b), use_cache=False, output_hidden_states=True, output_attentions=attention)
                out.hidden_states = [h.clone() for h in out.hidden_states]
                if attention:
                    out.attentions = [a.clone() for a in out.attentions]
                return out
            logits = self._slice(m(**model_inputs(b), use_cache=False).logits)
        return logits.clone() if clone else logits

    def logits_of(self, input_ids, attention_mask):
        """Its logits on inputs of its own tokenizer (a cross-tokenizer teacher)."""
        with self._mode(), self.autocast():
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def read_ahead(self, b):
        """Nothing to read ahead: a live teacher runs in the step."""

    # What a run asks of its teacher (run/distill.py), answered here rather than by `if` there.

    def width(self):
        """What models.check_vocab compares the student's vocabulary with: the model itself."""
        return self.model

    def check(self, cfg, s_tok, data: dict | None = None, vocab: int | None = None):
        """A live model has nothing to check against the run's settings or data."""

    def describe(self) -> str:
        return ""

    def params(self) -> int:
        return models.num_params(self.model)

    def eval_source(self):
        """What the evaluation reads the teacher from (eval/evaluate.py's score)."""
        return self.model

    def column(self, cmp: dict, ecfg, prompts, pad_id) -> dict:
        """Its column of the evaluation table: cmp's teacher numbers, its size and speed."""
        from stillroom.eval.evaluate import teacher_column
        from stillroom.run.shard import is_sharded

        return teacher_column(self.model, self.path, cmp, ecfg, prompts, pad_id, speed=not is_sharded(self.model))

    def note(self) -> str:
        """A line under the table (a sharded teacher's missing speed, else none)."""
        from stillroom.run.shard import is_sharded

        return ("\n(the teacher ran sharded over the processes: its generation speed is not measured)"
                if is_sharded(self.model) else "")


@dataclass
class CachedTeacher:
    """A top-k cache (`stillroom cache`): its targets are the stored rows of the batch's examples,
    read on the data thread ahead of the step when the loop asks (`read_ahead`)."""
    cache: object   # a cache.TeacherCache
    name: str = "teacher"
    weight: float = 1.0
    cached = True
    shardable = False

    def targets(self, b, need: str = "logits", attention: bool = False, clone: bool = False):
        ahead = (b.ahead or {}).get(self.name)
        if ahead is not None:
            return ahead
        return self.cache.targets(b.examples, b.input_ids.shape[1], b.input_ids.device).top

    def read_ahead(self, b):
        b.ahead = {**(b.ahead or {}), self.name: self.cache.targets(b.examples, b.input_ids.shape[1],
                                                                      b.input_ids.device).top}

    def width(self) -> int:
        """The width of the teacher's logits the cache was written from."""
        return self.cache.index["vocab_size"]

    def check(self, cfg, s_tok, data: dict | None = None, vocab: int | None = None):
        """The cache against the run: tokenizer, seq_len, temperature (before any data is read),
        its examples (`data`: {what: examples}), and its ids against the student's `vocab`."""
        if vocab is not None and vocab < self.width():
            raise UserError(f"the cached teacher's logits ({self.width()}) are wider than the "
                            f"student's ({vocab}): its top-k ids may not exist in the student")
        self.cache.check(cfg, s_tok, data)

    def describe(self) -> str:
        return f" (cached top-{self.cache.top_k} in {self.cache.path})"

    def params(self) -> int | None:
        return self.cache.index.get("teacher_params")

    def eval_source(self):
        return self.cache

    def column(self, cmp: dict, ecfg, prompts, pad_id) -> dict:
        """Not loaded: no size or speed to measure."""
        return {"perplexity": cmp["teacher_perplexity"], "bits_per_byte": cmp["teacher_bits_per_byte"],
                "agreement": None, "kl_per_token": None, "params": self.params(), "size_mb": None,
                "gen_tokens_per_s": None}

    def note(self) -> str:
        kl = ("KL is over its top-k + one tail bucket, a lower bound of the full KL" if self.cache.temperature == 1.0
              else f"no KL at T=1 from a cache at T={self.cache.temperature}")
        return f"\n(teacher read from the top-{self.cache.top_k} cache {self.cache.path}: {kl})"


class ServedTeacher(CachedTeacher):
    """A server that scores the text (teachers/served.py): its targets are the batch's top-k from
    the server, requested on the data thread ahead of the step (`read_ahead`), like a cache's rows."""

    def width(self) -> int:
        return self.cache.width

    def check(self, cfg, s_tok, data: dict | None = None, vocab: int | None = None):
        self.cache.check(s_tok, vocab)

    def describe(self) -> str:
        return f" (served at {self.cache.url}, top-{self.cache.top_k} per position)"

    def params(self) -> int | None:
        return None

    def note(self) -> str:
        return (f"\n(teacher scored by the server at {self.cache.url}: KL is over its top-{self.cache.top_k} + one "
                "tail bucket, a lower bound of the full KL)")


def served_teacher(tc, tok_source: str | None = None):
    """(models.Loaded without weights: teacher.model's tokenizer and config; the ServedScorer)."""
    from transformers import AutoConfig

    from stillroom.teachers.served import ServedScorer

    name = tok_source or tc.model
    _, where = models.resolve(name)
    tok = models.load_tokenizer(name)
    config = AutoConfig.from_pretrained(where)
    scorer = ServedScorer(tc.served, tok, tc.model)
    scorer.width = getattr(config, "vocab_size", None) or len(tok)
    return models.Loaded.without_weights(tok, tc.model, config), scorer


def route_weights(teachers: list, b, device) -> list:
    """Per teacher: its weight (mixture) or, with routing, a (B, S) one-hot of the examples routed
    to it (None where no example of the batch is)."""
    routes = [getattr(e, "route", None) for e in b.examples or []]
    if not any(r is not None for r in routes):
        return [t.weight for t in teachers]
    out = []
    S = b.input_ids.shape[1]
    for t in teachers:
        m = torch.tensor([r == t.name for r in routes], dtype=torch.float32, device=device)
        out.append(m[:, None].expand(len(routes), S) if m.any() else None)
    return out


def load_teacher(cfg, device, place, autocast=contextlib.nullcontext, sharded: bool = False):
    """The run's own teacher -> (models.Loaded: its tokenizer, config and name, its weights None
    from a cache; the teacher the step reads; cfg, with the data a cache was built from filled
    in where data.path is unset). A model is loaded straight into the dtype it runs in and
    handed to `place` (run/session.py: its device, or host memory with teacher.offload).
    sharded: the launch's processes shard the teacher (teacher.shard under train.shard=fsdp): it
    is sharded as it loads (run/shard.py's load_teacher), never whole."""
    tc = cfg.teacher
    if tc.kind == "cache":
        from stillroom.teachers.cache import TeacherCache
        cache = TeacherCache(tc.cache)
        loaded = models.Loaded.without_weights(cache.tokenizer(), cache.index["teacher"], cache.teacher_config())
        if cfg.data.path is None:  # the data the cache was built from
            cfg = cfg.model_copy(deep=True)
            cfg.data.path = cache.index["data"]["path"]
            cfg.data.eval_path = cache.index["data"]["eval_path"]
        return loaded, CachedTeacher(cache, tc.name, tc.weight), cfg
    if tc.kind == "served":
        loaded, scorer = served_teacher(tc)
        return loaded, ServedTeacher(scorer, tc.name, tc.weight), cfg
    dtype = running.teacher_dtype(tc.dtype, device)
    if sharded:
        from stillroom.run import shard
        loaded = shard.load_teacher(tc.model, dtype, device)
        return loaded, LiveTeacher(loaded.model, tc.name, tc.weight, None, autocast, loaded.path), cfg
    loaded = models.load(tc.model, dtype=dtype)
    place(loaded.model, offload=tc.offload, dtype=dtype)
    return loaded, LiveTeacher(loaded.model, tc.name, tc.weight, None, autocast, loaded.path), cfg


def load_teachers(cfg, primary, vocab, s_tok, accelerator) -> list:
    """The step's teachers, weights normalized: the primary (load_teacher's, given the shared
    logit width `vocab`) and each of teacher.mix (loaded here, checked against the student's
    tokenizer, given its teacher.mix attention)."""
    from stillroom.teachers.cache import TeacherCache

    autocast = accelerator.autocast
    if not primary.cached:
        primary.vocab = vocab
    out = [primary]
    for m in cfg.teacher.mix:
        if m.kind == "cache":
            src = TeacherCache(m.cache)
            src.check(cfg, s_tok)
            if src.index["vocab_size"] > vocab:
                raise UserError(f"teacher.mix '{m.name}': its cached logits ({src.index['vocab_size']}) are wider "
                                f"than the student's ({vocab})")
            out.append(CachedTeacher(src, m.name, m.weight))
        else:
            loaded = models.load(m.model, dtype=running.teacher_dtype(m.dtype, accelerator.device))
            w, _ = models.check_vocab(loaded.model, loaded.tokenizer, loaded.model, s_tok)
            if w < vocab:
                raise UserError(f"teacher.mix '{m.name}' ({m.model}) has {w} logits, fewer than the student's {vocab}")
            from stillroom.models.offload import place   # (as run/session.py places the primary)
            place(loaded.model, accelerator.device, m.offload, running.teacher_dtype(m.dtype, accelerator.device))
            running.set_teacher_attention(loaded.model, m.attention, accelerator.device, cfg.data.seq_len,
                                         f"teacher.mix '{m.name}': attention")
            out.append(LiveTeacher(loaded.model, m.name, m.weight, vocab, autocast))
    total = sum(t.weight for t in out) or 1.0
    for t in out:
        t.weight = t.weight / total
    return out


__all__ = ["LiveTeacher", "CachedTeacher", "ServedTeacher", "served_teacher", "route_weights", "load_teacher", "load_teachers"]
