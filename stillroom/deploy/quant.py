"""Quantization-aware distillation: the student trains through the exact quantizers of the GGUF
types it will be exported to, so the deployed file computes what was trained.

`fake_quant(w, "q4_0")` equals `gguf.quants.dequantize(gguf.quants.quantize(w, Q4_0), Q4_0)` bit for
bit (a test pins it): blocks of 32 along each row, one fp16 scale per block; Q8_0 is round(x / d),
d = max|x| / 127; Q4_0 is llama.cpp's trunc(x / d + 8.5) clamped to 0..15, d = (the block's largest
magnitude, signed) / -8. Training uses the straight-through estimator: the forward sees the
quantized weight, the gradient flows to the float weight as if quantization were the identity.
`train.qat` puts this on every linear layer of the decoder blocks (the matrices GGUF quantizes with
the chosen type); embeddings stay float (the export stores them in Q8_0). At the end the quantized
values are written into the weights, so final/ holds exactly what `stillroom export --type` stores.
"""
from __future__ import annotations

import torch
from torch.nn.utils import parametrize

BLOCK = 32


def fake_quant(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """w quantized to qtype and back (no gradient through the rounding)."""
    b = w.detach().float().reshape(-1, BLOCK)
    if qtype == "q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(b * inv)
    elif qtype == "q4_0":
        m = b.gather(-1, b.abs().argmax(-1, keepdim=True))
        d = m / -8
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc(b * inv + 8.5), max=15) - 8
    else:
        raise ValueError(f"qtype must be q8_0 or q4_0, got {qtype!r}")
    return (q * d.half().float()).reshape(w.shape).to(w.dtype)


class FakeQuant(torch.nn.Module):
    """Parametrization: the weight seen by the forward is fake_quant(w); d/dw is the identity (STE)."""

    def __init__(self, qtype: str):
        super().__init__()
        self.qtype = qtype

    def forward(self, w):
        return w + (fake_quant(w, self.qtype) - w).detach()


def targets(model) -> list[torch.nn.Linear]:
    base = getattr(model, "module", model)
    layers = getattr(getattr(base, "model", None), "layers", None) or []
    return [m for layer in layers for m in layer.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.shape[-1] % BLOCK == 0]


def enable(model, qtype: str) -> int:
    """Fake-quantize the decoder blocks' linear weights during training; -> how many."""
    mods = targets(model)
    for m in mods:
        parametrize.register_parametrization(m, "weight", FakeQuant(qtype))
    return len(mods)


def bake(model) -> None:
    """Write the quantized values into the weights and drop the parametrizations."""
    for m in targets(model):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
