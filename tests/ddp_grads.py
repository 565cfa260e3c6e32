"""Worker for tests/run/test_train.py: one optimizer step's gradient under `accelerate launch`.

Usage: accelerate launch --num_processes N tests/ddp_grads.py TEACHER_DIR DATA OUT.pt GRAD_ACCUM
Rank 0 writes the student's gradients (after DDP's all-reduce) to OUT.pt.
"""
import sys

import torch
from accelerate import Accelerator

from stillroom.config import Config
from stillroom.data.store import load_data
from stillroom.models import core as models
from stillroom.run.distill import accumulate
from stillroom.data.examples import to_batch
from stillroom.run.loop import window


def step_grads(teacher_dir, data, grad_accum, accelerator, batch_size=1, **loss):
    """-> (student gradients, step stats, this process's micro-batches) for optimizer step 0."""
    cfg = Config.model_validate({
        "teacher": {"model": teacher_dir}, "student": {"num_layers": 2},
        "data": {"path": data, "seq_len": 64, "eval_fraction": 0.0},
        "loss": {"alpha": 0.6, "temperature": 2.0, "chunk_rows": 7, **loss},
        "train": {"batch_size": batch_size, "grad_accum": grad_accum}})
    teacher = models.load(teacher_dir)
    student, _ = models.student_from_teacher(teacher.model, num_layers=2)
    train, _ = load_data(cfg, teacher.tokenizer)
    student = accelerator.prepare(student)
    batches = [to_batch(mb, teacher.tokenizer.pad_token_id, accelerator.device)
               for mb in window(train, 0, cfg, accelerator.process_index, accelerator.num_processes)]
    stats = accumulate(student, teacher.model, batches, cfg, accelerator)
    model = accelerator.unwrap_model(student)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, stats, batches


if __name__ == "__main__":
    teacher_dir, data, out, accum = sys.argv[1:5]
    acc = Accelerator(cpu=True)
    grads, stats, _ = step_grads(teacher_dir, data, int(accum), acc)
    if acc.is_main_process:
        torch.save({"grads": grads, "stats": stats, "world": acc.num_processes}, out)
    acc.wait_for_everyone()
