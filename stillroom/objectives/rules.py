"""Rules across config sections, in one place: combinations of methods that cannot work. Config's
validator runs them, so `stillroom distill --print-config`, the library's Distiller and distill
itself refuse the same configs, with one line, before anything is loaded. (Rules that need what
a file holds, a cache's index or a model's vocabulary, are checked where it is read.)"""
from __future__ import annotations

from pathlib import Path

from stillroom.errors import UserError

# The hidden-state / attention terms of loss.terms and the kind of distance each is (methods.py).
FEATURE_TERMS = {"hidden_cosine": "cosine", "hidden_mse": "mse", "attention": None}


def teacher_terms(terms: dict) -> dict:
    """The terms that read a teacher's distribution (not CE, not the hidden-state terms)."""
    return {k: v for k, v in terms.items() if k != "ce" and k not in FEATURE_TERMS}


def weighed_terms(cfg) -> dict:
    """Every term the loss weighs at some step ({term: its weight at the first or the last step}):
    a scheduled alpha that starts at 0 still brings its teacher term."""
    n = cfg.train.max_steps
    return {**cfg.loss.spec(n - 1, n), **cfg.loss.spec(0, n)}


def check_served(cfg):
    """A served teacher scores the run's own text at T = 1 (distill and codistill alike)."""
    lc = cfg.loss
    if cfg.teacher.kind != "served":
        return
    if not cfg.data.path:
        raise UserError("teacher.kind=served scores your text: set data.path (the default data is the teacher's "
                        "own answers, which need a local teacher to write)")
    if lc.temperature != 1.0 or lc.temperature_end not in (None, 1.0):
        raise UserError("loss.temperature: a served teacher's log-probs are at T=1 and the mass outside its "
                        "top-k at another T cannot be known: set loss.temperature=1 (or cache a live teacher "
                        "at that T)")


def check_across(cfg):
    """Rules across sections: combinations of methods that cannot work, refused when the config is
    read (so `--print-config` refuses what `distill` would), before anything is loaded."""
    lc, tc = cfg.loss, cfg.teacher
    terms = weighed_terms(cfg)
    cached = tc.kind in ("cache", "served") or any(m.kind == "cache" for m in tc.mix)
    check_served(cfg)
    if cached and lc.temperature_end not in (None, lc.temperature):
        raise UserError("loss.temperature_end: a top-k cache holds the teacher at one temperature; "
                        "schedule the temperature with a live teacher (alpha may still be scheduled)")
    full = [k for k, v in teacher_terms(terms).items() if v and k not in ("forward_kl", "hard")]
    if cached and full:
        raise UserError(f"loss {full[0]} needs the teacher's full distribution; a top-k cache or a served "
                        "teacher supports forward_kl and hard only: use a live teacher")
    feats = [k for k in terms if k in FEATURE_TERMS]
    if feats and tc.kind in ("cache", "served"):
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
    if tc.shard:
        if cfg.train.shard != "fsdp":
            raise UserError("teacher.shard=true shards the teacher beside a sharded student: set train.shard=fsdp")
        if tc.kind != "live" or tc.offload or tc.route_field:
            raise UserError("teacher.shard=true runs the live teacher on every process at every step: not with "
                            "teacher.kind=cache, teacher.offload or teacher.route_field, nor a served teacher")
        if lc.cross_tokenizer != "none":
            raise UserError("teacher.shard=true is not built for loss.cross_tokenizer (the evaluation measures that "
                            "teacher in its own tokens on one process): set teacher.shard=false")
    if cfg.train.shard == "fsdp":
        if cfg.train.qat != "none":
            raise UserError("train.shard=fsdp does not run train.qat yet (its fake-quantized weights are "
                            "parametrizations the shards would not gather): set train.qat=none or train.shard=none")
    ft = getattr(cfg, "finetune", None)
    if ft is not None and not Path(ft.data).exists() and (Path(ft.data).suffix or ft.data.count("/") != 1):
        raise UserError(f"finetune.data not found: {ft.data}")
    if tc.route_field and cfg.data.pack:
        raise UserError("data.pack would put examples of different teachers in one row: "
                        "teacher.route_field needs data.pack=false")
    if lc.on_policy and (tc.route_field or cfg.data.pack):
        raise UserError("loss.on_policy rewrites each example from its prompt: not with teacher.route_field "
                        "or data.pack")


def check_codistill(cfg, default_loss):
    """Rules of a co-distillation config (CodistillRunConfig): what is a distill setting only (a loss
    key changed from `default_loss`), and what its modes can run."""
    lc, d = cfg.loss, default_loss
    for key in ("divergence", "terms", "token_weight", "balance", "on_policy", "cross_tokenizer",
                "alpha_end", "temperature_end", "layer_map"):
        if getattr(lc, key) != getattr(d, key):
            raise UserError(f"loss.{key} is a `stillroom distill` setting; co-distillation uses loss.kind, "
                            "alpha, temperature and chunk_rows (forward KL between peers)")
    if any(p.prune_heads or p.prune_intermediate for p in cfg.peers):
        raise UserError("width pruning (prune_heads / prune_intermediate) is a `stillroom distill` setting; "
                        "prune a student with distill, then give it to a peer as init: pretrained")
    if cfg.teacher.mix or cfg.teacher.route_field:
        raise UserError("teacher.mix / teacher.route_field are `stillroom distill` settings; co-distillation "
                        "takes one teacher")
    check_served(cfg)
    if len(cfg.peers) < 2:
        raise UserError("codistill needs at least 2 peers")
    if cfg.codistill.confidence and cfg.codistill.mode == "predictions":
        raise UserError("codistill.confidence is built for modes mutual and weights (the codistill recipe "
                        "turns it on): add codistill.confidence=false for mode predictions")
    if cfg.train.shard == "fsdp" and cfg.codistill.mode != "mutual":
        raise UserError(f"train.shard=fsdp shards the peers of codistill.mode=mutual; mode "
                        f"{cfg.codistill.mode} trains one peer per process (set train.shard=none)")
    if cfg.teacher.shard:
        raise UserError("teacher.shard is not built for co-distillation: set teacher.shard=false "
                        "(train.shard=fsdp still shards the peers)")
    names = [p.name for p in cfg.peers]
    if len(set(names)) != len(names):
        raise UserError(f"peer names must be distinct, got {names}")
