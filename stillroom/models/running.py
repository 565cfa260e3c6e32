"""How a model runs: its device and dtype (the GPU when there is one; bf16 where the device runs it
natively), its attention implementation, activation checkpointing, and the lean loss path's
pieces (a causal LM's final hidden states and output head, checked to give its logits exactly).
Loading and building models is models/core.py."""
from __future__ import annotations

import torch

from stillroom.errors import UserError


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run faster than fp32 (on a CPU without them, slower)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def best_device() -> torch.device:
    """Where a command that is not launched runs its models: the GPU when there is one. (A launched
    run's device is Accelerate's: run/tracking.py.)"""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def teacher_dtype(name: str, device) -> torch.dtype:
    """teacher.dtype -> a torch dtype. auto: bf16 where the device runs it natively (a CUDA GPU
    with bf16, a CPU with AVX512-BF16 or AMX), else fp32. The teacher only runs forward, in
    inference mode; its logits go to the loss in fp32."""
    if name != "auto":
        return getattr(torch, name)
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if kind == "cpu" and cpu_has_native_bf16() else torch.float32


ATTENTION_AUTO_MAX_LEN = 1024


def teacher_attention(name: str, device, seq_len: int) -> str | None:
    """teacher.attention -> the attention implementation to give the teacher (None: keep the
    model's own, sdpa for most). auto: on a CPU, eager attention for rows of up to 1024 tokens:
    PyTorch's CPU flash kernel (which sdpa runs there) is slower than transformers' eager attention
    (two batched matmuls and a softmax) at these lengths. The bundled teacher's forward, three or
    four runs a length of bench/attention.py on an AVX512-BF16 CPU: 0.81-0.94x sdpa's time at
    128-512 tokens; at 1024 0.90-0.96x in three runs, 1.16x in one; 0.97-1.08x at 2048, where
    eager's (heads, len, len) scores also start to weigh, so auto leaves it there. The teacher only
    runs forward, so eager keeps no scores for a backward. Elsewhere (a GPU) the model's own."""
    if name != "auto":
        return name
    return "eager" if torch.device(device).type == "cpu" and seq_len <= ATTENTION_AUTO_MAX_LEN else None


def check_attention(name: str, what: str = "teacher.attention") -> None:
    """Before any data is read: a flash attention whose package this install lacks is a UserError
    (set_teacher_attention catches the rest when it sets it)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available
    have = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if name in have and not have[name]():
        raise UserError(f"{what}={name} cannot run here (its package is not installed): set it to auto, sdpa "
                        "or eager")


def set_teacher_attention(model, name: str, device, seq_len: int, what: str = "teacher.attention") -> None:
    """Give a teacher the attention teacher_attention picks; an implementation this install cannot
    run (flash_attention_2 without its package) is a UserError."""
    set_attention(model, teacher_attention(name, device, seq_len), what)


def set_attention(model, impl: str | None, what: str) -> None:
    """Give a model an attention implementation (None or "auto": keep its own); one this install
    cannot run is a UserError naming the setting `what`."""
    if model is None or impl in (None, "auto") or impl == model.config._attn_implementation:
        return
    check_attention(impl, what)
    try:
        model.set_attn_implementation(impl)
    except (ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}={impl} cannot run here ({first.rstrip('.')}): set it to auto, sdpa or eager") from None


def checkpoint_activations(model) -> None:
    """train.gradient_checkpointing: each decoder layer recomputed in the backward (non-reentrant),
    by transformers' own switch (activation_checkpointing_enable; its older name before it)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def final_hidden(model, **inputs) -> torch.Tensor:
    """(B, S, H): a causal LM's final hidden states, the input of its output head. Runs the model's
    own forward (so a DDP wrapper syncs gradients as usual) with logits for one position only, and
    takes the base model's output on its way out (a hook): no other layer's hidden states are
    returned and kept, as output_hidden_states would."""
    inner = getattr(model, "module", model)   # (a DDP wrapper)
    seen = {}

    def keep(module, args, out):
        seen["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = inner.base_model.register_forward_hook(keep)
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return seen["h"]


def base_hidden(model, **inputs) -> torch.Tensor:
    """Like final_hidden, for a model that is never wrapped (the teacher): its base model alone,
    so no other layer's hidden states are kept."""
    return model.base_model(**inputs, use_cache=False).last_hidden_state


def output_head(model, width: int | None = None, base: bool = False):
    """(weight (V, H), bias or None) of a model whose logits are exactly final_hidden @ weight.T +
    bias, sliced to `width` rows; None when they are not (logit soft-capping, scaling, a non-linear
    head). base=True: also require base_hidden to give those hidden states (the teacher's way).
    Checked once per model on a few tokens, so the lean path can never silently compute
    something else than the model's logits."""
    model = getattr(model, "module", model)
    if not hasattr(model, "_stillroom_head"):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        ok = ok_base = isinstance(head, torch.nn.Linear)
        if ok:
            p = next(model.parameters())
            ids = torch.arange(1, 9, device=p.device).clamp(max=head.weight.shape[0] - 1)[None]
            was = model.training
            model.eval()
            # Under mixed precision Accelerate wraps forward in autocast (its head then runs in bf16,
            # as the lean loss's head does with its dtype): the structure is checked unwrapped, in
            # fp32, through the module's call (so FSDP2's hooks still gather a sharded model).
            wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
            if wrapped is not None:
                model.forward = model._original_forward
            try:
                with torch.no_grad():
                    full = model(input_ids=ids, use_cache=False).logits.float()
                    h = final_hidden(model, input_ids=ids)
                    mine = torch.nn.functional.linear(h, head.weight, head.bias).float()
                    try:
                        h_base = base_hidden(model, input_ids=ids)
                        ok_base = torch.allclose(h_base, h, rtol=1e-4, atol=1e-5)
                    except Exception:  # no base_model forward of that shape: only the student's way works
                        ok_base = False
            finally:
                if wrapped is not None:
                    model.forward = wrapped
            model.train(was)
            ok = torch.allclose(mine, full, rtol=1e-3, atol=1e-3 * float(full.abs().max()) + 1e-6)
        model._stillroom_head = {"head": ok, "base": ok and ok_base}
    if not model._stillroom_head["base" if base else "head"]:
        return None
    head = model.get_output_embeddings()
    w, b = head.weight, head.bias
    return (w[:width], None if b is None else b[:width]) if width else (w, b)
