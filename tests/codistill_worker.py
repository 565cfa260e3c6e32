"""Worker for tests/run/test_codistill.py: the cross-process pieces of co-distillation under `accelerate launch`.

Usage: accelerate launch --multi_gpu --num_processes 2 tests/codistill_worker.py TEACHER_DIR DATA OUT TOP_K
Rank r writes OUT.r.pt with its peer's gradient after one predictions-mode step, and the copies of
every peer it holds after a weights-mode exchange.
"""
import sys

import torch
from accelerate import Accelerator

from stillroom.config import CodistillRunConfig
from stillroom.data.examples import micro_batch
from stillroom.data.store import load_data
from stillroom.models import core as models
from stillroom.objectives.peers import PeerPlan, Predictions, exchange_weights
from stillroom.run.loop import Step, Trainee, accumulate
from stillroom.data.examples import to_batch
from stillroom.teachers.core import LiveTeacher


def setup(teacher_dir, data, top_k):
    cfg = CodistillRunConfig.model_validate({
        "teacher": {"model": teacher_dir},
        "peers": [{"name": "a", "init": "from_teacher", "num_layers": 2},
                  {"name": "b", "init": "config", "num_layers": 2, "hidden_size": 32, "num_heads": 4}],
        "data": {"path": data, "seq_len": 64, "eval_fraction": 0.0},
        "loss": {"alpha": 0.7, "temperature": 2.0, "chunk_rows": 7},
        "codistill": {"mode": "predictions", "top_k": top_k, "teacher_weight": 0.25},
        "train": {"batch_size": 2}})
    teacher = models.load(teacher_dir)
    built = [models.build_student(p, teacher, cfg.train.seed + i)[0] for i, p in enumerate(cfg.peers)]
    train, _ = load_data(cfg, teacher.tokenizer)
    return cfg, teacher, built, train


def step0_batches(cfg, train, rank, world, pad):
    """Step 0's batches as the loop makes them: own shard micro-batch, and the shared batch."""
    t = cfg.train
    own = [to_batch(micro_batch(train[rank::world], 0, t.batch_size, t.seed), pad, "cpu")]
    shared = to_batch(micro_batch(train, 0, t.batch_size, t.seed + 1), pad, "cpu")
    return own, shared


def perturbed(model, rank):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * (rank + 1))
    return model


if __name__ == "__main__":
    teacher_dir, data, out, top_k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    cfg, teacher, built, train = setup(teacher_dir, data, top_k)
    own, shared = step0_batches(cfg, train, rank, world, teacher.tokenizer.pad_token_id)
    name, plan = cfg.peers[rank].name, PeerPlan(0, 1.0)
    objective = Predictions(cfg, LiveTeacher(teacher.model), None, [p.name for p in cfg.peers], rank, world)
    batches = objective.prepare([shared, *own], plan, Step(0, {name: built[rank]}, [], acc))
    loss = accumulate([Trainee(name, built[rank], None, None, replicated=False)], objective, batches, plan,
                      acc)["loss"][name]
    grads = {n: p.grad.clone() for n, p in built[rank].named_parameters()}
    # weights mode: every process's own peer has moved (differently); after the exchange each
    # process must hold every peer's moved weights
    own_model = perturbed(built[rank], rank)
    copies = [own_model if j == rank else built[j] for j in range(world)]
    snapshot = exchange_weights(own_model, copies, rank)
    torch.save({"loss": loss, "grads": grads, "world": world, "snapshot": snapshot,
                "copies": [{k: v.clone() for k, v in m.state_dict().items()} for m in copies]},
               f"{out}.{rank}.pt")
    acc.wait_for_everyone()
