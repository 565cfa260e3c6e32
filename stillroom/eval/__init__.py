"""How close the student came: held-out scores and the evaluation table (evaluate.py), generation
tasks (tasks.py), lm-evaluation-harness (harness.py), the draft-model check (draft.py), and the
run report (report.py)."""
