"""run/grads.py: data-parallel gradient averaging overlapped with the backward (2 gloo processes).
A whole distill run under 2 processes is pinned elsewhere (test_train.py: 2 processes == 1;
test_faults.py: a failure on one process stops both with its line)."""
import json
from pathlib import Path

from conftest import launch


HERE = Path(__file__).resolve().parents[1]   # tests/: the workers live there


def test_buckets_are_reduced_during_the_backward_and_equal_the_reduction_after_it(tmp_path):
    launch(2, HERE / "grads_worker.py", tmp_path / "out")
    for rank in (0, 1):
        r = json.loads((tmp_path / f"out.{rank}").read_text())
        assert r["buckets"] >= 4
        # when the first layer's weight (the last gradient) is final, the buckets of the layers
        # above it are on their way already: all but the one holding it
        assert r["launched_before_the_last_gradient"] == r["buckets"] - 1
        assert r["equal"]        # bit for bit average_grads after the backward
        assert r["failed_mean"]  # a process that failed early takes part: both finish, the mean is exact
