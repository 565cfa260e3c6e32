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

from stillroom.errors import UserError

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
    base = getattr(model, "base_model", model)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in base.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and (n is None or len(mod) == n):
            return list(mod)
    raise UserError(f"train.shard=fsdp: no list of decoder layers found in {type(model).__name__} to shard "
                    "(set train.shard=none)")


def shard(model: torch.nn.Module, frozen: bool = False, gather_root: bool = True,
          precision: str = "no") -> torch.nn.Module:
    """fully_shard each decoder layer, then the model (in place; -> the model). frozen: a teacher,
    run forward only (its weights gathered per layer and freed after); gather_root=False leaves
    its root group sharded (a model on the meta device, whose weights come after: load_teacher).
    precision: the run's mixed precision (its accelerator's); under bf16 a trained model's
    weights are gathered and run in bf16 and its gradients reduced in fp32 (FSDP2's
    MixedPrecisionPolicy, as torchtitan trains), so the gathers move half the bytes; its shards,
    their gradients and the optimizer stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if precision == "bf16" and not frozen:   # (a teacher's weights are in the dtype it runs in already)
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if frozen:   # the root group (embeddings, final norm, output head) gathered once and kept so:
        model.requires_grad_(False)   # the lean loss reads the head, base_model runs without the root's forward
        if gather_root:
            model.unshard()
    return model


def load_teacher(spec: str, dtype: torch.dtype, device):
    """teacher.shard=true under several processes: the teacher sharded as it loads, as torchtitan
    and torchtune load a model too large for one device -> models.Loaded. Every process builds
    it on the meta device (no storage), shards it per decoder layer, and only then gives storage
    to its own shards; the main process reads each tensor from the weight files, one process's
    rows at a time (in blocks) and sends them straight into that process's shard. No process holds
    the whole teacher, on the device or in host memory: each holds its shards and the root group
    (which a frozen teacher keeps gathered), the main process one block more while it reads.
    Non-persistent buffers (rotary frequencies) are computed on the host by the model's own code.
    A folder without safetensors files, a hub model or files whose tensors are named otherwise
    are loaded whole on the main process (said in the log) and sent the same way. Every process of
    the launch's process group calls it; process 0 is the main one."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from stillroom.models import core as models
    from stillroom.run.feedback import phase

    import torch.distributed as dist

    main, world = dist.get_rank() == 0, dist.get_world_size()
    found = None
    if main:   # (a GGUF converted once, by the main process; a refusal reaches every process)
        try:
            kind, where = models.resolve(spec)
            found = (kind, str(where))
        except UserError as e:
            found = ("error", str(e))
    kind, where = _broadcast(found)
    if kind == "error":
        raise UserError(where)
    if kind == "folder" and not Path(where).is_dir():   # another machine of the launch: its own copy
        kind, where = models.resolve(spec)
    tok = models.load_tokenizer(str(where))
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the config of '{spec}': {(str(e).splitlines() or [''])[0][:200]}") from None
    with init_empty_weights(include_buffers=False):   # parameters on meta, buffers computed on the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()   # (tied inside init_empty_weights, the output head got a meta copy of its own)
    models.freeze(model)
    shard(model, frozen=True, gather_root=False)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}   # a tied output head once, as its input's
    model.to_empty(device=device)   # storage for this process's shards only
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    read, how = _weights(where, kind, shapes, dtype) if main else (None, None)
    how = _broadcast(how)
    if how.startswith("error: "):
        raise UserError(how[len("error: "):])
    params = dict(model.named_parameters(remove_duplicate=False))
    with phase(f"loading {spec} sharded over {world} processes ({how})"), torch.no_grad():
        for name in shapes:
            _scatter(params[name], read(name) if main else None, main, dtype)
    model.unshard()   # the root group gathered, as shard(frozen=True) leaves a teacher
    return models.Loaded(model, tok, spec, Path(where) if kind == "folder" else None)


BLOCK = 1 << 18   # elements the main process reads and sends at once (1 MB of fp32)


def _scatter(p, read, main: bool, dtype):
    """One sharded parameter filled from the main process's `read`: each process's rows (FSDP2
    shards dim 0 as torch.chunk does) are read on the main process in blocks of at most BLOCK
    elements and sent straight into that process's shard, so no other process ever holds more
    than its own rows, and the main process one block more."""
    import torch.distributed as dist

    local, world, rank = p.to_local(), dist.get_world_size(), dist.get_rank()
    n = p.shape[0]
    per, row = -(-n // world), max(1, p.numel() // max(n, 1))
    block = max(1, BLOCK // row)   # rows at a time
    for r in range(world):
        first, end = min(r * per, n), min((r + 1) * per, n)
        for a in range(first, end, block):
            b = min(a + block, end)
            mine = local[a - first:b - first] if r == rank else None
            if main:
                rows = read(a, b).to(local.device, dtype)
                if r == 0:
                    mine.copy_(rows)
                else:
                    dist.send(rows.contiguous(), dst=r)
            elif r == rank:
                got = mine if mine.is_contiguous() else torch.empty_like(mine)
                dist.recv(got, src=0)
                if got is not mine:
                    mine.copy_(got)


def _weights(where, kind: str, shapes: dict, dtype):
    """On the main process: (name -> reader of its rows start:stop, how they are read); how is
    "error: ..." when the weights cannot be read. From the folder's safetensors files a slice at a
    time when they hold every parameter by its name and shape, else from the model loaded whole."""
    files = sorted(Path(where).glob("*.safetensors")) if kind == "folder" else []
    if files:
        from safetensors import safe_open
        try:
            handles = {k: h for h in (safe_open(str(f), "pt") for f in files) for k in h.keys()}
            found = {n: tuple(handles[n].get_slice(n).get_shape()) for n in shapes if n in handles}
        except Exception as e:   # a damaged file: said in one line by every process
            return None, f"error: could not read the weights in {where}: {type(e).__name__}: {str(e)[:200]}"
        if found == shapes:
            return (lambda n: lambda a, b: handles[n].get_slice(n)[a:b]), "read in blocks from its safetensors files"
    from stillroom.models import core as models
    try:
        whole = models.load(str(where), dtype=dtype).model.state_dict()
    except UserError as e:
        return None, f"error: {e}"
    return (lambda n: lambda a, b: whole[n][a:b]), "loaded whole on the main process: its files cannot be read in blocks"


def _broadcast(value):
    """The main process's `value` on every process."""
    import torch.distributed as dist
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


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
