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
ON_DEVICE = ["losses/test_losses.py", "losses/test_lean.py", "losses/test_divergences.py",
             "objectives/test_methods_losses.py", "losses/test_host_syncs.py"]
CPU_FACT = "run/test_train.py::test_a_run_gives_the_teacher_eager_attention_on_a_cpu_and_the_student_its_own"


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


def _device_scripts():
    text = (HERE.parent / "bench" / "gpu_check.sh").read_text()
    return re.findall(r"^cat >\"\$WORK/py/(\w+\.py)\" <<'EOF'\n(.*?)^EOF$", text, flags=re.M | re.S)


def test_the_device_checks_scripts_name_only_what_stillroom_has():
    """bench/gpu_check.sh writes its Python scripts from heredocs, so a name moved inside stillroom
    breaks them only on the device (or in CI's dry run): every stillroom import and every attribute
    read from an imported stillroom module must exist now."""
    import ast
    import importlib
    scripts = _device_scripts()
    assert len(scripts) >= 5, [name for name, _ in scripts]
    missing = []
    for name, src in scripts:
        tree = ast.parse(src, filename=name)
        modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stillroom"):
                mod = importlib.import_module(node.module)
                for a in node.names:
                    if hasattr(mod, a.name):
                        got = getattr(mod, a.name)
                    else:
                        try:
                            got = importlib.import_module(f"{node.module}.{a.name}")
                        except ImportError:
                            missing.append(f"{name}: from {node.module} import {a.name}")
                            continue
                    if type(got).__name__ == "module":
                        modules[a.asname or a.name] = got
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("stillroom") and a.asname:
                        modules[a.asname] = importlib.import_module(a.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in modules and not hasattr(modules[node.value.id], node.attr)):
                missing.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not missing, missing
