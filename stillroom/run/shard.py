"""FSDP2: a model sharded across the processes of a launch (`train.shard=fsdp`; the teacher too
with `teacher.shard=true`).

PyTorch's own `fully_shard` (torch.distributed.fsdp), per decoder layer and then the whole model,
as torchtitan and torchtune shard a causal LM: each process keeps 1/N of every parameter, its
gradient and its optimizer state; a layer's weights are gathered for its forward and backward
and freed after, and its gradients are reduce-scattered (averaged over the processes, as DDP's
all-reduce averages them). It runs with gloo on CPU (tested here with 2 processes) and NCCL on
GPUs. The output head and embeddings sit in the root group, which FSDP2 keeps gathered from the
forward to the backward, so the lean loss reads the whole output head after the forward and its
gradient is reduce-scattered with the rest (pinned by tests against one process). A sharded
teacher (frozen) keeps its root group gathered and its layers sharded, each gathered for its
forward and freed after; every process runs it on every step, together.

Checkpoints are sharded (`torch.distributed.checkpoint`: each process writes its own shards of the
model and optimizer), and `final/` is a plain Hugging Face folder: the full state is gathered to
the main process (to the CPU) and loaded into an unsharded model of the same config.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger("stillroom")

# Our forwards never modify a model's outputs in place (a gradient written into the logits'
# storage happens in backward, after FSDP's hooks ran), which is what this warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def active(cfg, accelerator) -> bool:
    """train.shard=fsdp under several processes (one process has nothing to shard across)."""
    return getattr(cfg.train, "shard", "none") == "fsdp" and accelerator.num_processes > 1


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's list of decoder blocks: its base model's ModuleList of num_hidden_layers modules
    (`layers` in Llama, Qwen, Gemma...; `h` in GPT-2)."""
    from stillroom.errors import UserError

    base = getattr(model, "base_model", model)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in base.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and (n is None or len(mod) == n):
            return list(mod)
    raise UserError(f"train.shard=fsdp: no list of decoder layers found in {type(model).__name__} to shard "
                    "(set train.shard=none)")


def shard(model: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
    """fully_shard each decoder layer, then the model (in place; -> the model). frozen: a teacher,
    run forward only (its weights gathered per layer and freed after)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    if frozen:   # the root group (embeddings, final norm, output head) gathered once and kept so:
        model.requires_grad_(False)   # the lean loss reads the head, base_model runs without the root's forward
        model.unshard()
    return model


def grad_norm(params, max_norm: float) -> float:
    """Clip the gradients of `params` (sharded ones and plain ones together) to `max_norm` by their
    total norm over all processes; -> that norm (inf / nan when not finite: the step is skipped)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    parts = []
    if sharded:
        n = torch.nn.utils.get_total_norm(sharded)
        parts.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if plain:
        parts.append(torch.nn.utils.get_total_norm(plain))
    if not parts:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack([x.float() for x in parts]))
    if max_norm and max_norm < float("inf"):
        for group in (sharded, plain):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)


def full_state(model) -> dict:
    """The whole model's state (every process takes part; the main process gets it, on the CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(model, state: dict):
    """A plain model of `model`'s config holding `state` (what final/ and the evaluation read)."""
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state.values())).dtype
    plain = AutoModelForCausalLM.from_config(model.config, torch_dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"gathered state does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        plain.tie_weights()
    if hasattr(model, "generation_config"):
        plain.generation_config = model.generation_config
    return plain


def save(folder: Path, modules: torch.nn.Module, optimizer, scheduler, main: bool):
    """A sharded checkpoint of `modules` (the student and the objective's trained modules) and
    their optimizer into folder/sharded (every process writes its shards), and the scheduler's
    state (the main process) into folder/scheduler.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(modules, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(Path(folder) / "sharded"))
    if main:
        torch.save(scheduler.state_dict(), Path(folder) / "scheduler.pt")


def load(folder: Path, modules: torch.nn.Module, optimizer, scheduler):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(modules, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(Path(folder) / "sharded"))
    set_state_dict(modules, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(Path(folder) / "scheduler.pt"))
