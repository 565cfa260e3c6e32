"""Worker for tests/run/test_shard.py: the gradients of step 1 of real distill runs, one per objective.

Usage: [accelerate launch --num_processes 2] tests/fsdp_grads.py TEACHER_DIR DATA OUT_DIR SHARD GRAD_ACCUM
Each objective's run goes through `stillroom.run.distill.distill` up to its first step (the loop,
`stillroom.run.loop.fit`, which the run session calls, is replaced by one step that writes every
trained parameter's whole gradient, gathered from the
shards under FSDP2, to OUT_DIR/<objective>.pt on the main process) and stops there; then a
co-distillation run in mutual mode does the same (OUT_DIR/codistill.pt, every peer's gradients).
"""
import sys
from pathlib import Path

import torch

from stillroom.recipes import load_config
from stillroom.run import distill as train
from stillroom.run import loop

OBJECTIVES = {
    "soft_lean": [],
    "soft_plain": ["loss.lean=false"],
    "hard": ["loss.kind=hard", "loss.alpha=0.5"],
    "terms": ["loss.terms={ce: 0.5, forward_kl: 0.3, reverse_kl: 0.1, hidden_mse: 0.2}"],
    "on_policy": ["loss.on_policy=1.0", "loss.on_policy_tokens=5", "loss.on_policy_prompt_tokens=8"],
    # the teacher sharded too (one process: nothing to shard, the same reference)
    "soft_lean_teacher_sharded": ["teacher.shard=true"],
    "terms_teacher_sharded": ["teacher.shard=true",
                              "loss.terms={ce: 0.5, forward_kl: 0.3, reverse_kl: 0.1, hidden_mse: 0.2}"],
}


class Done(BaseException):
    pass


def main(teacher_dir, data, out_dir, how, grad_accum):
    from torch.distributed.tensor import DTensor

    out_dir = Path(out_dir)
    for name, extra in OBJECTIVES.items():
        def one_step(trainees, objective, batches, *, cfg, accelerator, **kw):
            bs = batches(0)
            objective.read_ahead(bs, objective.plan(0))
            _, stats = loop.train_step(0, bs, trainees, objective, cfg, accelerator)
            tr = trainees[0]
            modules = {"student": tr.model, **{f"extra{i}": m for i, m in enumerate(tr.extra)}}
            grads = {f"{k}.{n}": (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
                     for k, m in modules.items() for n, p in m.named_parameters() if p.grad is not None}
            if accelerator.is_main_process:
                torch.save({"grads": grads, "loss": stats["loss"], "world": accelerator.num_processes,
                            "sharded": type(tr.model).__name__}, out_dir / f"{name}.pt")
            accelerator.wait_for_everyone()
            raise Done

        loop.fit = one_step
        over = [f"teacher.model={teacher_dir}", f"data.path={data}", f"train.output_dir={out_dir / ('run-' + name)}",
                "student.num_layers=2", "data.seq_len=64", "train.batch_size=2", f"train.grad_accum={grad_accum}",
                "data.eval_fraction=0.1", "eval.gen_tokens=2", "eval.gen_prompts=1", f"train.shard={how}",
                "loss.chunk_rows=7", "train.mixed_precision=no", *extra]   # equal to fp32 rounding; under bf16
        # autocast the sharded and whole models round differently (a sharded bf16 run: test_shard's resume test)
        try:
            train.distill(load_config(None, over), overwrite=True, progress=False)
        except Done:
            pass


def codistill_mutual(teacher_dir, data, out_dir, how, grad_accum):
    """The same for co-distillation's mutual mode: every peer's gradients -> OUT_DIR/codistill.pt."""
    from torch.distributed.tensor import DTensor

    from stillroom.config import CodistillRunConfig
    from stillroom.run import codistill

    out_dir = Path(out_dir)

    def one_step(trainees, objective, batches, *, cfg, accelerator, **kw):
        _, stats = loop.train_step(0, batches(0), trainees, objective, cfg, accelerator)
        grads = {f"{tr.name}.{n}": (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
                 for tr in trainees for n, p in tr.model.named_parameters() if p.grad is not None}
        if accelerator.is_main_process:
            torch.save({"grads": grads, "loss": stats["loss"], "world": accelerator.num_processes,
                        "sharded": type(trainees[0].model).__name__}, out_dir / "codistill.pt")
        accelerator.wait_for_everyone()
        raise Done

    loop.fit = one_step
    cfg = CodistillRunConfig.model_validate({
        "teacher": {"model": teacher_dir},
        "peers": [{"name": "a", "init": "from_teacher", "num_layers": 2},
                  {"name": "b", "init": "config", "num_layers": 2, "hidden_size": 32, "num_heads": 4}],
        "data": {"path": data, "seq_len": 64}, "loss": {"alpha": 0.5}, "codistill": {"teacher_weight": 0.3},
        "train": {"output_dir": str(out_dir / "run-codistill"), "batch_size": 2, "grad_accum": grad_accum,
                  "shard": how, "mixed_precision": "no"},
        "eval": {"gen_tokens": 2, "gen_prompts": 1}})
    try:
        codistill.codistill(cfg, overwrite=True, progress=False)
    except Done:
        pass


if __name__ == "__main__":
    main(*sys.argv[1:5], int(sys.argv[5]))
    codistill_mutual(*sys.argv[1:5], int(sys.argv[5]))
