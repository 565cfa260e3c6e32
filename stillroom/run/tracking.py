"""The run's machine and what watches it: Accelerate (processes, mixed precision, trackers),
the CPU threads of each process, and what the trackers (train.report_to) are given: the config as
flat hyperparameters, each log record's numbers as flat scalars."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from stillroom.errors import UserError


def launch_state():
    """(Accelerate's PartialState, its device) under accelerate launch / torchrun, where cache and
    generate split their batches over the processes; (None, cuda or cpu) in one process."""
    from stillroom.models.running import best_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, best_device().type
    from accelerate import PartialState

    state = PartialState(cpu=best_device().type == "cpu")   # cpu: gloo, not N lone processes
    return state, state.device


def set_threads(cfg, accelerator):
    """torch's CPU threads for this process (see train.threads); -> the number set."""
    import torch

    n = cfg.train.threads
    if not n and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = int(os.environ["OMP_NUM_THREADS"])
    if not n:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        n = max(1, (os.cpu_count() or 1) // max(1, local))
        n = min(n, torch.get_num_threads()) if local == 1 else n   # alone: torch's default (physical cores)
    torch.set_num_threads(n)
    return n


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_GLIBC_KNOBS = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"}


def keep_cpu_memory() -> str:
    """Keep freed memory in the process for reuse (glibc's malloc) on a machine without a GPU;
    -> what was done, one phrase for the log.

    A training step on CPU allocates and frees the same large buffers (logits, their softmaxes,
    gradients: tens to hundreds of MB each) every step. glibc hands every block over 32 MB back to
    the kernel on free (mmap/munmap) and trims the heap's top, so the next step faults every page
    in again, each zeroed by the kernel: on an AVX512-BF16 CPU with 2 cores that was over half of a
    student's CE step (bench/peers.py, student CE: 0.51 s per step under glibc's defaults, 0.24 s
    with memory kept). What PyTorch's caching allocator does on GPUs, and its CPU tuning guide gets
    from jemalloc or tcmalloc, glibc does with two settings: no mmap below 2 GB, no trim below 2 GB
    free at the heap's top. The cost: the process's resident memory stays near its peak between
    steps.

    Left alone: on a GPU machine (an NVIDIA or AMD driver loaded: the host allocates little), off
    glibc, under an allocator the user preloaded (LD_PRELOAD), where the user set glibc's own
    MALLOC_*_ or GLIBC_TUNABLES, or with STILLROOM_KEEP_MEMORY=0. Called for the CLI's process and
    by a run that owns its process as it owns its threads (`train.distill`), not by the
    `Distiller`: a library caller may call it."""
    import platform

    if os.environ.get("STILLROOM_KEEP_MEMORY", "1") == "0":
        return "glibc defaults (STILLROOM_KEEP_MEMORY=0)"
    if os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/kfd"):   # without importing torch
        return "unchanged (a GPU machine)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "unchanged (not glibc)"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(a in preload for a in _ALLOCATORS):
        return f"the preloaded allocator ({preload})"
    if _GLIBC_KNOBS & set(os.environ) or any(k in os.environ.get("GLIBC_TUNABLES", "")
                                             for k in ("mmap_threshold", "trim_threshold")):
        return "glibc as set in the environment"
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 2**31 - 1) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        ok = False
    return "freed memory kept for reuse (STILLROOM_KEEP_MEMORY=0: glibc defaults)" if ok else "unchanged"


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
    (bench/precision.py on an AVX512-BF16 CPU; docs/distill.md, 'Speed and memory')."""
    import torch

    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    from stillroom.models.running import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "no"


def make_accelerator(cfg, out: Path, threads: bool = True):
    from accelerate import Accelerator

    from stillroom.models.running import best_device

    device = best_device().type
    mp = student_precision(cfg.train.mixed_precision, device)
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
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mp,
                              log_with=cfg.train.report_to or None, project_dir=str(out))
    if threads:   # the CLI's process is ours; a library caller's threads and allocator are theirs
        set_threads(cfg, accelerator)
        keep_cpu_memory()
    return accelerator


def hparams(config: dict) -> dict:
    """The config as trackers take hyperparameters: dotted keys (the flattening --resume compares
    configs with), scalar values (lists and None as their JSON text; tensorboard refuses anything else)."""
    from stillroom.run.outputs import flat

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
