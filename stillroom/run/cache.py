"""`stillroom cache`: the teacher's top-k over a run's data, written once so that training never
runs the teacher (teachers/cache.py writes and reads the shards). The teacher is a local model (one
process or a launch: each process scores its share), a served one (the server scores the text), or
none: an API's logprobs file or another tool's capture is converted, no teacher run.
"""
from __future__ import annotations

import os

from stillroom.errors import UserError
from stillroom.models import core as models
from stillroom.models import running
from stillroom.run.distill import check_context, prepare_data


def build_cache(cfg, overwrite: bool, progress: bool) -> dict | None:
    """`stillroom cache`: the teacher's top-k over the config's data (cache.source=logprobs: from an
    API's logprobs file, no teacher run) -> the cache's summary; None on a launch's other processes."""
    from types import SimpleNamespace

    from stillroom.run.tracking import launch_state
    from stillroom.teachers.cache import build, existing, summary

    if cfg.cache.source in ("logprobs", "vllm", "axolotl", "distillkit"):   # the teacher's tokenizer and config only
        from transformers import AutoConfig

        from stillroom.teachers.api import build_from_logprobs
        from stillroom.teachers.captures import import_capture

        if not cfg.data.path:
            raise UserError(f"cache.source={cfg.cache.source} reads data.path: " + (
                "the JSONL that `stillroom generate --api ... --top-logprobs K` wrote" if cfg.cache.source == "logprobs"
                else "a vLLM capture (JSONL rows of prompt_token_ids and prompt_logprobs)" if cfg.cache.source == "vllm"
                else "an axolotl KD dataset (JSONL rows of input_ids and logprobs)" if cfg.cache.source == "axolotl"
                else "a DistillKit capture (a folder of data_*.parquet and compression_config.yaml)"))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(f"cache.source={cfg.cache.source} only reads a file (no teacher runs): run it as one "
                            "process, without accelerate launch")
        kind, where = models.resolve(cfg.teacher.model)
        build = build_from_logprobs if cfg.cache.source == "logprobs" else import_capture
        build(cfg, models.load_tokenizer(cfg.teacher.model), AutoConfig.from_pretrained(where), overwrite, progress)
        return summary(cfg.cache.path)
    state, device = launch_state()
    if cfg.teacher.kind == "served":   # the server scores the text: only the tokenizer and config here
        from stillroom.teachers.core import served_teacher

        loaded, scorer = served_teacher(cfg.teacher)
        check_context(cfg, loaded.config)
        scorer.check(loaded.tokenizer, scorer.width)   # every process: each settles the shape it speaks
        if state is None or state.is_main_process:
            existing(cfg, scorer, loaded.tokenizer, overwrite, skip=("data",))
        cfg, train, held = prepare_data(cfg, loaded, state or SimpleNamespace(is_main_process=True, num_processes=1))
        try:
            build(cfg, train + held, scorer, loaded.tokenizer, overwrite=overwrite, progress=progress, state=state,
                  config=loaded.config)
        finally:
            scorer.close()
        return summary(cfg.cache.path) if state is None or state.is_main_process else None
    teacher = models.load(cfg.teacher.model, dtype=running.teacher_dtype(cfg.teacher.dtype, device))
    check_context(cfg, teacher.model.config)
    running.set_teacher_attention(teacher.model, cfg.teacher.attention, device, cfg.data.seq_len)
    if state is None or state.is_main_process:   # before any data work
        existing(cfg, teacher.model, teacher.tokenizer, overwrite, skip=("data",))
    cfg, train, held = prepare_data(cfg, teacher, state or SimpleNamespace(is_main_process=True, num_processes=1))
    teacher.model.to(device)
    build(cfg, train + held, teacher.model, teacher.tokenizer, overwrite=overwrite, progress=progress, state=state)
    return summary(cfg.cache.path) if state is None or state.is_main_process else None
