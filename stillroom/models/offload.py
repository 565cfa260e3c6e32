"""teacher.offload: a teacher larger than what the device has left beside the student, run from
host memory one decoder layer at a time (as DeepSpeed's and Accelerate's offload run a frozen
model). Its embeddings, final norm, output head and buffers stay on the device; each decoder
layer's weights live in host memory (pinned on CUDA, so the copy is a DMA that does not stall the
host) and are copied to the device by a hook just before that layer runs, and dropped after it:
the device holds one layer of the stack at a time. Not built: prefetching the next layer on a
side stream while this one computes (it needs a GPU to measure)."""
from __future__ import annotations

import torch


def place(model: torch.nn.Module, device, offload: bool = False, dtype=None) -> torch.nn.Module:
    """The model on `device`, its parameters in `dtype` when given (models.cast_parameters: its
    buffers as the model made them). offload: its decoder layers in host memory, each brought to
    the device for its own forward (offload_layers; on a CPU there is nothing to offload)."""
    from stillroom.models.core import cast_parameters

    if offload and torch.device(device).type != "cpu":
        return offload_layers(cast_parameters(model.to("cpu"), dtype), device)
    return cast_parameters(model.to(device), dtype)


def offload_layers(model: torch.nn.Module, device, pin: bool | None = None) -> torch.nn.Module:
    """In place: everything but the decoder layers on `device`; each layer's parameters in host
    memory, brought to `device` for the layer's own forward (-> the model). pin: page-locked host
    copies (default: when `device` is CUDA)."""
    from stillroom.run.shard import decoder_layers

    device = torch.device(device)
    pin = device.type == "cuda" if pin is None else pin
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    # the rest of the model (and every buffer) to the device, as model.to(device) moves it
    model._apply(lambda t: t if id(t) in in_layers else t.to(device))
    with torch.no_grad():
        for layer in layers:
            host = []
            for p in layer.parameters():
                h = p.data.to("cpu")
                host.append((p, h.pin_memory() if pin else h))
                p.data = host[-1][1]
            layer.register_forward_pre_hook(_to_device(host, device))
            layer.register_forward_hook(_to_host(host))
    model._stillroom_offloaded = device
    return model


def _to_device(host, device):
    def hook(module, args):
        for p, h in host:   # a copy even where host and device are one (a CPU run of the mechanism)
            p.data = h.to(device, non_blocking=True, copy=True)
    return hook


def _to_host(host):
    def hook(module, args, out):
        for p, h in host:
            p.data = h
    return hook


def offloaded(model) -> bool:
    return getattr(model, "_stillroom_offloaded", None) is not None
