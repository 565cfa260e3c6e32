"""Device placement, pinned without a GPU: the run's device is `meta` (a device with shapes and no
data), so a model left on the CPU, or a batch left on the wrong side, meets a model on another
device exactly as it would on a GPU. A spy on every forward records each call whose inputs are
not on its parameters' device. A meta run stops at the first number read off the device (the
evaluation before training, after the student's and the teacher's forwards: a model on meta
answers with logits of the right shape); every forward up to there must have matched (run/session.py places
every model before anything runs on it; the evaluation moves inputs to the model that reads them)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides


@pytest.fixture
def meta_run(monkeypatch):
    """Runs get an accelerator whose device is `meta`; -> the spy's records of forwards:
    (model class, its parameters' device, the devices of its tensor inputs)."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from stillroom.run import tracking

    real_make = tracking.make_accelerator

    def make(cfg, out, threads=True):
        acc = real_make(cfg, out, threads=threads)
        acc.__class__ = type("MetaAccelerator", (type(acc),), {"device": property(lambda self: torch.device("meta"))})
        return acc

    monkeypatch.setattr(tracking, "make_accelerator", make)
    calls = []
    real_forward = LlamaForCausalLM.forward

    def forward(self, *args, **kwargs):
        own = next(self.parameters()).device
        seen = {v.device for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)}
        calls.append((type(self).__name__, own, seen))
        if own.type != "meta":   # (an offloaded teacher runs for real on the CPU)
            return real_forward(self, *args, **kwargs)
        # a model on meta cannot run (transformers reads its mask's values): logits of the right
        # shape, on its device, stand in for its output
        ids = kwargs.get("input_ids", args[0] if args else None)
        return CausalLMOutputWithPast(logits=torch.zeros(*ids.shape, self.config.vocab_size, device=own))

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    return calls


def _misplaced(calls):
    return [(name, str(own), sorted(map(str, seen))) for name, own, seen in calls if seen - {own}]


@pytest.mark.parametrize("extra", [[], ["teacher.offload=true"]], ids=["placed", "offloaded teacher"])
def test_every_forward_reads_its_inputs_on_its_own_device(tmp_path, teacher_dir, chat_file, meta_run, extra):
    from stillroom.recipes import load_config
    from stillroom.run.distill import distill

    # student.init=config: a student cut from a meta teacher has no weights to copy
    cfg = load_config(None, tiny_overrides(teacher_dir, chat_file, tmp_path / "r")
                      + ["student.init=config", "student.hidden_size=32", "student.intermediate_size=64",
                         "student.num_heads=4", "student.num_kv_heads=2", *extra])
    with pytest.raises((NotImplementedError, RuntimeError)) as got:   # a number read off a meta tensor
        distill(cfg, progress=False)
    assert "meta" in str(got.value), got.value
    assert len(meta_run) >= 2, meta_run   # the student's and the teacher's forwards ran
    assert not _misplaced(meta_run), _misplaced(meta_run)


def test_an_offloaded_teacher_holds_one_layer_on_the_device_at_a_time(teacher_dir, device):
    """teacher.offload (models/offload.py): everything but the decoder layers is placed; each layer's
    weights stay in host memory and are copied to the device for that layer's forward alone, then
    dropped. On the suite's device (on the CPU the copies are made all the same; on CUDA the host
    weights are pinned): during layer i's forward only layer i's weights are device copies, after
    it every layer is back on its host weights, and the logits equal the model's own on the device,
    under inference mode and no_grad alike."""
    from stillroom.models import core as models
    from stillroom.models.offload import offload_layers, offloaded
    from stillroom.run.shard import decoder_layers

    plain = models.load(str(teacher_dir)).model.to(device)
    model = offload_layers(models.load(str(teacher_dir)).model, device)
    assert offloaded(model) and not offloaded(plain)
    layers = decoder_layers(model)
    host = [[p.data_ptr() for p in layer.parameters()] for layer in layers]
    seen = []

    def watch(i):
        def hook(module, args):   # registered after offload's own: sees what the layer runs with
            seen.append([[p.data_ptr() for p in layer.parameters()] != host[j] for j, layer in enumerate(layers)])
        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(watch(i))
    x = torch.randint(0, plain.config.vocab_size, (2, 12), device=device)
    assert next(model.parameters()).device.type == device.type and all(
        p.device.type == "cpu" and p.is_pinned() == (device.type == "cuda") for layer in layers for p in layer.parameters())
    for mode in (torch.inference_mode, torch.no_grad):
        seen.clear()
        with mode():
            got, want = model(input_ids=x).logits, plain(input_ids=x).logits
        assert torch.equal(got, want)
        assert seen == [[j == i for j in range(len(layers))] for i in range(len(layers))]   # one layer at a time
        assert [[p.data_ptr() for p in layer.parameters()] for layer in layers] == host   # all back on the host
