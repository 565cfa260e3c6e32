"""The run's machine and what watches it: Accelerate (processes, mixed precision, trackers),
the CPU threads of each process, and what the trackers (train.report_to) are given: the config as
flat hyperparameters, each log record's numbers as flat scalars."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .errors import UserError


def launch_state():
    """(Accelerate's PartialState, its device) under accelerate launch / torchrun, where cache and
    generate split their batches over the processes; (None, cuda or cpu) in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, "cuda" if torch.cuda.is_available() else "cpu"
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())   # cpu: gloo, not N lone processes
    return state, state.device


def set_threads(cfg, accelerator):
    """torch's CPU threads for this process (see train.threads); -> the number set."""
    n = cfg.train.threads
    if not n and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = int(os.environ["OMP_NUM_THREADS"])
    if not n:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        n = max(1, (os.cpu_count() or 1) // max(1, local))
        n = min(n, torch.get_num_threads()) if local == 1 else n   # alone: torch's default (physical cores)
    torch.set_num_threads(n)
    return n


# The trackers Accelerate writes to (train.report_to), and the package each one needs.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow",
                    "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
                    "swanlab": "swanlab"}


def student_precision(name: str, device) -> str:
    """train.mixed_precision -> what Accelerate runs the student in ("no", "bf16", "fp16"). auto:
    bf16 autocast (fp32 master weights, optimizer state and loss) where the device runs bf16
    natively -- a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX -- else fp32 (a CPU without
    them emulates bf16, many times slower). On the bundled teacher's 6-layer student, 80 steps in
    bf16 reached the held-out perplexity of fp32 within 0.1% at 0.74x the time per step
    (bench/precision.py on an AVX512-BF16 CPU; README, 'Speed and memory')."""
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    from .models import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "no"


def make_accelerator(cfg, out: Path, threads: bool = True):
    from accelerate import Accelerator

    mp = student_precision(cfg.train.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    import importlib.util

    if "trackio" in cfg.train.report_to:   # its local database lives with the run, as tensorboard's files do
        os.environ.setdefault("TRACKIO_DIR", str(out.resolve() / "trackio"))
    for tracker in cfg.train.report_to:
        package = TRACKER_PACKAGES[tracker]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"train.report_to=[{tracker}] needs: pip install {package}")
    from accelerate.state import AcceleratorState

    # Accelerate keeps one process-wide state and refuses a second Accelerator with another
    # precision: a library caller's second run (fp32, then bf16) starts that state afresh.
    if AcceleratorState._shared_state.get("_mixed_precision", mp) != mp:
        AcceleratorState._reset_state()
    # cpu=True on a machine without CUDA: under `accelerate launch --multi_gpu --num_processes N`
    # that makes Accelerate use gloo (MULTI_CPU) instead of silently running N single processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp,
                              log_with=cfg.train.report_to or None, project_dir=str(out))
    if threads:   # the CLI's process is ours; a library caller's thread count is theirs
        set_threads(cfg, accelerator)
    return accelerator


def hparams(config: dict) -> dict:
    """The config as trackers take hyperparameters: dotted keys (the flattening --resume compares
    configs with), scalar values (lists and None as their JSON text; tensorboard refuses anything else)."""
    from .outputs import flat

    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat(config).items()}


def scalars(record: dict, prefix: str = "") -> dict:
    """What a tracker gets: the record's numbers, nested dicts flattened with "/" (terms/ce, a
    per-trainee loss/<name>, eval/...); the step is the tracker's own axis."""
    out = {}
    for k, v in record.items():
        if k == "step" and not prefix:
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = v
    return out
