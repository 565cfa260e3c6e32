"""Where the teacher's side of the loss comes from: a live model or a top-k cache (core.py), the
cache itself (cache.py), an OpenAI-compatible API (api.py), and generation of teacher answers
(generate.py)."""
