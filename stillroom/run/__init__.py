"""Running a training command: the loop (loop.py), distill and codistill on it, `stillroom cache`
(cache.py), and what a run writes and guards (outputs: checkpoints and final/; folders: locks and
markers; shard: FSDP2; tracking: the accelerator and trackers; faults: failpoints; feedback: progress)."""
