"""Worker for tests/run/test_shard.py: teacher.shard's loading (run/shard.py's load_teacher) under 2 gloo
processes, with spies on every way weights are read.

Usage: torchrun --nproc_per_node 2 tests/shard_load.py TEACHER_DIR OUT [BLOCK]
BLOCK: the elements read and sent at once (run/shard.py's BLOCK; default its own).
On the main process, OUT gets JSON: what each process read from the safetensors files (elements,
the largest single read, whole tensors), how many times a whole model was loaded
(from_pretrained, on any process), whether
every parameter arrived (the process's shard of each equals the whole teacher's, the tied head is
its input embedding) and whether the sharded teacher's logits equal the whole teacher's.
"""
import json
import sys

import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from stillroom.models import core as models
from stillroom.run import shard

dist.init_process_group("gloo")
rank = dist.get_rank()


seen = {"elements_read": 0, "largest_read": 0, "whole_tensors_read": 0, "whole_loads": 0}
real_open, real_load = safe_open, AutoModelForCausalLM.from_pretrained


class Sliced:   # a tensor's slice, whose reads are counted
    def __init__(self, sl):
        self.sl = sl

    def get_shape(self):
        return self.sl.get_shape()

    def __getitem__(self, index):
        t = self.sl[index]
        seen["elements_read"] += t.numel()
        seen["largest_read"] = max(seen["largest_read"], t.numel())
        return t


class Counted:   # safe_open whose reads are counted
    def __init__(self, *a, **k):
        self.h = real_open(*a, **k)

    def __getattr__(self, name):
        return getattr(self.h, name)

    def get_slice(self, name):
        return Sliced(self.h.get_slice(name))

    def get_tensor(self, name):
        seen["whole_tensors_read"] += 1
        return self.h.get_tensor(name)


def whole(*a, **k):
    seen["whole_loads"] += 1
    return real_load(*a, **k)


import safetensors   # noqa: E402
safetensors.safe_open = Counted
AutoModelForCausalLM.from_pretrained = whole

teacher_dir, out = sys.argv[1:3]
if len(sys.argv) > 3:
    shard.BLOCK = int(sys.argv[3])
dtype = torch.float32
model = shard.load_teacher(teacher_dir, dtype, torch.device("cpu")).model
counts = [None, None]
dist.all_gather_object(counts, seen)
AutoModelForCausalLM.from_pretrained = real_load
ref = models.load(teacher_dir, dtype=dtype).model   # the whole teacher, for the comparison
params = dict(model.named_parameters(remove_duplicate=False))
from torch.distributed.tensor import DTensor   # noqa: E402
equal = all(torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, ref.state_dict()[n]) for n, p in params.items())
torch.manual_seed(0)
x = torch.randint(0, model.config.vocab_size, (2, 24))
with torch.no_grad():
    same = torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
if rank == 0:
    unique = dict(model.named_parameters())
    json.dump({"counts": counts, "equal": equal, "same_logits": same,
               "params": [models.num_params(model), models.num_params(ref)],   # (as the run's log and table say)
               "elements": sum(p.numel() for p in unique.values()),
               "half_of_largest": max(-(-p.shape[0] // 2) * (p.numel() // p.shape[0]) for p in unique.values()),
               "layers_sharded": all(isinstance(p, DTensor) for n, p in model.named_parameters() if ".layers." in n),
               "tied": model.config.tie_word_embeddings, "n_params": len(dict(model.named_parameters()))},
              open(out, "w"))
dist.barrier()
