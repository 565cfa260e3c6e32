"""The suite honours STILLROOM_TEST_DEVICE: a dry run of its device-aware part with
STILLROOM_TEST_DEVICE=cuda on this machine (no CUDA here) must skip every such test for want of
CUDA, not run it on the CPU; a test whose expectation is a CPU fact is skipped as one. On a GPU
machine the same command runs them on CUDA (the device check, bench/gpu_check.sh, does)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ON_DEVICE = ["test_losses.py", "test_lean.py", "test_divergences.py", "test_methods_losses.py", "test_host_syncs.py"]
CPU_FACT = "test_train.py::test_a_run_gives_the_teacher_eager_attention_on_a_cpu_and_the_student_its_own"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run for a machine without CUDA")
def test_a_cuda_target_is_honoured_or_skipped_never_run_on_the_cpu():
    env = dict(os.environ, STILLROOM_TEST_DEVICE="cuda")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *ON_DEVICE, CPU_FACT],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    tail = r.stdout.strip().splitlines()[-1]
    assert "passed" not in tail and "failed" not in tail and re.search(r"\d+ skipped", tail), tail
    reasons = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", r.stdout, flags=re.M)
    assert {why for _, why in reasons} == {"STILLROOM_TEST_DEVICE=cuda on a machine without CUDA",
                                            "a CPU expectation: teacher.attention=auto picks eager attention on a CPU only"}
    assert sum(int(n) for n, _ in reasons) == int(re.search(r"(\d+) skipped", tail).group(1))
