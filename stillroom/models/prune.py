"""Width pruning (Minitron, Muralidharan et al. 2024): drop the least important attention heads and
MLP channels, ranked by their activations on calibration data, keeping a valid, smaller HF model.

Importance, from forward passes over calibration examples (no gradients):
  MLP channel c of a layer:  mean over tokens of |act(gate(x)) * up(x)|_c   (the down projection's input)
  attention head h:          mean over tokens of || head h's output ||_2    (the o projection's input)
Heads are kept per key/value group, the same number in each, so grouped-query attention keeps its
shape (every group keeps its k / v). The hidden size (embedding channels) is not pruned here.
Depth (student.init=from_teacher, num_layers) and width combine: the width is pruned on the
depth-pruned model. Distillation then recovers what pruning lost.
"""
from __future__ import annotations

import copy
import logging

import torch

from stillroom.errors import UserError

log = logging.getLogger("stillroom")


def _layers(model):
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if model.config.model_type not in ("llama", "mistral", "qwen2") or layers is None:
        raise UserError(f"width pruning supports Llama-style models; this one is {model.config.model_type}")
    return layers


@torch.no_grad()
def importance(model, batches) -> list[dict]:
    """Per layer: {"mlp": (I,) channel scores, "heads": (H,) head scores}, from `batches` of model
    inputs (dicts with input_ids and attention_mask). Padding positions are not counted."""
    layers = _layers(model)
    cfg = model.config
    H = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    scores = [{"mlp": torch.zeros(cfg.intermediate_size), "heads": torch.zeros(H), "n": 0} for _ in layers]
    mask = {}

    def hook(i, kind):
        def pre(module, args):
            x = args[0].float()
            m = mask["m"].to(x.dtype)[..., None]
            if kind == "mlp":
                scores[i]["mlp"] += (x.abs() * m).sum((0, 1)).cpu()
            else:
                per = x.reshape(*x.shape[:2], H, d).norm(dim=-1)
                scores[i]["heads"] += (per * m).sum((0, 1)).cpu()
        return pre

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(i, "mlp")))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(i, "attn")))
    was = model.training
    model.eval()
    tokens = 0
    try:
        for b in batches:
            mask["m"] = b["attention_mask"].bool()
            tokens += int(mask["m"].sum())
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if not tokens:
        raise UserError("width pruning: no calibration tokens")
    return [{"mlp": s["mlp"] / tokens, "heads": s["heads"] / tokens} for s in scores]


def prune_width(model, imp: list[dict], heads: int | None = None, intermediate: int | None = None):
    """A new, smaller model of the same class: in every layer the `intermediate` most important MLP
    channels and `heads` most important query heads (the same number per key/value group) kept, their
    weights copied; everything else copied as is. None keeps that dimension."""
    _layers(model)   # a Llama-style model, or one line saying it is not
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    heads = heads or H
    intermediate = intermediate or cfg.intermediate_size
    if not 1 <= intermediate <= cfg.intermediate_size:
        raise UserError(f"student.prune_intermediate={intermediate}: choose 1..{cfg.intermediate_size}")
    if not 1 <= heads <= H or heads % KV:
        raise UserError(f"student.prune_heads={heads}: choose a multiple of the {KV} key/value heads, "
                        f"at most {H} (every group keeps the same number of query heads)")
    per_group, group = heads // KV, H // KV
    new_cfg = copy.deepcopy(cfg)
    new_cfg.num_attention_heads, new_cfg.intermediate_size, new_cfg.head_dim = heads, intermediate, d
    from transformers import AutoModelForCausalLM
    small = AutoModelForCausalLM.from_config(new_cfg, dtype=next(model.parameters()).dtype)
    state = model.state_dict()
    keep = []
    for i, s in enumerate(imp):
        ch = s["mlp"].topk(intermediate).indices.sort().values
        hs = torch.cat([g * group + s["heads"][g * group:(g + 1) * group].topk(per_group).indices.sort().values
                        for g in range(KV)])
        rows = (hs[:, None] * d + torch.arange(d)).reshape(-1)
        p = f"model.layers.{i}."
        state[p + "mlp.gate_proj.weight"] = state[p + "mlp.gate_proj.weight"][ch]
        state[p + "mlp.up_proj.weight"] = state[p + "mlp.up_proj.weight"][ch]
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, ch]
        state[p + "self_attn.q_proj.weight"] = state[p + "self_attn.q_proj.weight"][rows]
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, rows]
        for b in ("gate_proj", "up_proj"):
            if p + f"mlp.{b}.bias" in state:
                state[p + f"mlp.{b}.bias"] = state[p + f"mlp.{b}.bias"][ch]
        if p + "self_attn.q_proj.bias" in state:
            state[p + "self_attn.q_proj.bias"] = state[p + "self_attn.q_proj.bias"][rows]
        keep.append({"heads": hs.tolist(), "channels": len(ch)})
    missing, unexpected = small.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(new_cfg, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise UserError(f"width pruning produced mismatched weights: {sorted(set(missing) - tied)[:3]} "
                        f"{unexpected[:3]}")
    small.train(model.training)
    small.requires_grad_(True)
    return small, keep


def calibrate_and_prune(model, examples, pad_id, scfg, batch_size=8):
    """The student pruned to student.prune_heads / prune_intermediate on its first
    student.calibration_examples training examples; -> (model, one-line description)."""
    from stillroom.data.examples import collate

    ex = examples[:scfg.calibration_examples]
    batches = []
    for a in range(0, len(ex), batch_size):
        c = collate(ex[a:a + batch_size], pad_id)
        batches.append({"input_ids": c["input_ids"], "attention_mask": c["attention_mask"]})
    dev = next(model.parameters()).device
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    before = sum(p.numel() for p in model.parameters())
    small, _ = prune_width(model, importance(model, batches), scfg.prune_heads, scfg.prune_intermediate)
    after = sum(p.numel() for p in small.parameters())
    cfg = small.config
    return small, (f"width-pruned on {len(ex)} calibration examples to {cfg.num_attention_heads} heads, "
                   f"MLP {cfg.intermediate_size} ({before:,} -> {after:,} params)")
