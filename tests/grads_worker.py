"""Worker for tests/run/test_grads.py (2 gloo processes): run/grads.py's Reducer against average_grads.

Usage: torchrun --nproc_per_node 2 tests/grads_worker.py OUT
A chain of linear layers (the first one's weight finishes last in the backward, like a decoder's
embeddings), two micro-batches of different data on each process, buckets of about one layer:
  overlap: the buckets launched before the backward reached the first layer, and the order;
  equal:   the Reducer's gradients == average_grads' after the same backward, bit for bit;
  failed:  process 1 fails before its last micro-batch (never arms) and only calls finish():
           both processes finish (the same collectives), process 0 gets (its grads + process 1's
           partial ones) / 2, and no gradient is missing on process 1.
"""
import json
import sys

import torch
import torch.distributed as dist

from stillroom.run.grads import Reducer, average_grads

dist.init_process_group("gloo")
rank = dist.get_rank()


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])


def backward(m, i):
    g = torch.Generator().manual_seed(100 * rank + i)
    m(torch.randn(8, 16, generator=g)).square().sum().backward()


out = {}
ref = model()
for i in range(2):
    backward(ref, i)
average_grads(list(ref.parameters()), 2, bucket=300)

m = model()
seen = []   # (registered before the Reducer's hook: it runs first) the buckets launched by then
m[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(r.next))
r = Reducer(list(m.parameters()), 2, bucket=300)
backward(m, 0)
r.arm()
backward(m, 1)
r.close()
r.finish()
out["buckets"] = len(r.buckets)
out["launched_before_the_last_gradient"] = seen[-1]
out["equal"] = all(torch.equal(a.grad, b.grad) for a, b in zip(ref.parameters(), m.parameters()))

plain = model()   # each process's own gradients, not averaged
backward(plain, 0)
if rank == 0:
    backward(plain, 1)
local = [p.grad for p in plain.parameters()]
m = model()
r = Reducer(list(m.parameters()), 2, bucket=300)
backward(m, 0)
if rank == 0:   # process 1 "fails" before its last micro-batch: it never arms, and finishes all the same
    r.arm()
    backward(m, 1)
r.close()
r.finish()
both = [[torch.zeros_like(x) for x in local] for _ in range(2)]
for k, x in enumerate(local):
    dist.all_gather([b[k] for b in both], x)
out["failed_mean"] = all(torch.equal(p.grad, a.div(2) + b.div(2)) for p, a, b in zip(m.parameters(), *both))
json.dump(out, open(f"{sys.argv[1]}.{rank}", "w"))
dist.barrier()
dist.destroy_process_group()
