"""Models: loading (a Hugging Face folder or hub id, a GGUF file, the bundled teacher), building a
student from a teacher or a config, vocabulary checks (core.py), and pruning (prune.py)."""
