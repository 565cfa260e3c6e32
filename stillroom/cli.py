"""`stillroom` command line: the verbs' flags (a table of verbs, a function each) and main; what
each verb does is commands.py (one function a verb).

    stillroom distill [CONFIG.yaml | RECIPE] [key=value ...] [--overwrite | --resume] [--print-config]
    stillroom codistill [CONFIG.yaml | RECIPE] [key=value ...] [--overwrite | --resume] [--print-config]
    stillroom cache [CONFIG.yaml | RECIPE] [key=value ...] [--overwrite]
    stillroom eval --model DIR --teacher NAME_OR_PATH --data FILE [--json]
    stillroom generate --out FILE.jsonl [--prompts FILE] [--teacher NAME_OR_PATH] [...]

User errors print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from stillroom import commands
from stillroom.errors import Stopped, Terminated, UserError, on_sigterm

log = logging.getLogger("stillroom")


def _quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("gguf").setLevel(logging.ERROR)   # its writer narrates every file
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's "Using default tokenizer."


def _number(kind, low=None, high=None, above=None):
    """An argparse type: `kind` within bounds, or argparse's one-line usage error naming the flag."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if (low is not None and v < low) or (high is not None and v > high) or (above is not None and v <= above):
            want = " and ".join(w for w in (f">= {low}" if low is not None else "", f"> {above}" if above is not None
                                            else "", f"<= {high}" if high is not None else "") if w)
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


POSITIVE = _number(int, low=1)


def config_flags(group, section, defaults=None, skip=(), only=None):
    """A flag per field of a config section (`--kebab-name`, dest the field's name): its type,
    choices and help come from the field (its docstring), so a flag-style verb and the config say
    the same in one place; values are validated by the section itself (flag_section, naming the
    flag in the message). A bool field that defaults to true is `--no-NAME`.
    defaults: the verb's own defaults where they differ from the config's; only: these fields alone."""
    import typing

    for name, f in section.model_fields.items():
        if name in skip or (only is not None and name not in only):
            continue
        args = [a for a in (f.annotation, *typing.get_args(f.annotation)) if a is not type(None)]
        literal = next((a for a in args if typing.get_origin(a) is typing.Literal), None)
        kind = next((a for a in args if a in (bool, int, float, str)), str)
        default = (defaults or {}).get(name, f.default)
        text = " ".join((f.description or "").split())
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            if default:
                group.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false",
                                   help=f"off: {text[0].lower() + text[1:]}" if text else None)
            else:
                group.add_argument(flag, dest=name, action="store_true", help=text)
            group.set_defaults(**{name: default})
        else:
            group.add_argument(flag, dest=name, type=kind, default=default, help=text,
                               **({"choices": typing.get_args(literal)} if literal else {}))


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as the same one line as every other error (exit 2)."""

    def error(self, message):
        self.exit(2, f"stillroom: error: {message} (see `{self.prog} --help`)\n")


def _config_command(sub, name, help, description, args_help, overwrite_help, resume_help=None):
    """A subcommand driven by a config: [CONFIG] [key=value ...] and the common flags."""
    c = sub.add_parser(name, help=help, description=description)
    c.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]", help=args_help)
    if overwrite_help:
        c.add_argument("--overwrite", action="store_true", help=overwrite_help)
    if resume_help:
        c.add_argument("--resume", action="store_true", help=resume_help)
    c.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    return c


def _config_verbs(sub):
    """distill, codistill, prepare and cache: a config (a file or a recipe) and overrides."""
    runs = (("distill", "train a student from a teacher",
             "Train a student to match a teacher. With no config: the embedded default (bundled SmolLM2-135M "
             "teacher, 6-layer student, soft labels).",
             "a YAML file or bundled recipe (soft, hard, jsd, on_policy, hidden, multi_teacher, adaptive, "
             "cross_tokenizer, two_stage, pruned: see configs/), then dotted overrides like train.lr=1e-4",
             "continue from the last checkpoint in the output folder"),
            ("codistill", "train two or more models that teach each other",
             "Co-distillation: peers learn from the labels and from each other (codistill.mode: mutual in one "
             "process; predictions or weights with one peer per process under accelerate launch).",
             "a YAML file or bundled recipe (codistill, codistill_distributed), then dotted overrides like "
             "peers.1.num_layers=4 or codistill.mode=weights",
             "continue every peer from the last checkpoint"))
    for name, help, description, args_help, resume_help in runs:
        _config_command(sub, name, help, description, args_help, "replace an existing output folder",
                        resume_help).set_defaults(func=commands.cmd_distill)
    _config_command(sub, "prepare", "tokenize a config's data once, into the store runs read it from",
                         "Build the data store of a config ahead of its run (distill, codistill and cache build "
                         "it on first use otherwise): the data tokenized once, on every core, kept under the "
                         "stillroom cache (or data.store=FOLDER) and reused while the files, tokenizer and data "
                         "settings are the same.",
                         "a YAML file or bundled recipe (distill or codistill), then overrides like data.path=FILE "
                         "data.workers=8", None).set_defaults(func=commands.cmd_prepare, resume=False, overwrite=False)
    ca = _config_command(sub, "cache", "run the teacher once over the data and store its top-k outputs",
                         "Cache the teacher's top-k next-token distributions (at loss.temperature) over the config's "
                         "data; train from it with teacher.kind=cache teacher.cache=DIR. Running it again continues "
                         "an interrupted cache.",
                         "a YAML file or bundled recipe, then overrides like cache.path=runs/cache cache.top_k=64",
                         "replace a cache built differently (or the --export-vllm / --export-axolotl file, or the "
                         "--export-distillkit folder's capture)")
    ca.set_defaults(func=commands.cmd_cache, resume=False)
    ca.add_argument("--export-vllm", metavar="FILE",
                   help="write the cache at teacher.cache (teacher.kind=cache) as a vLLM prompt_logprobs capture "
                        "(JSONL) instead of building one")
    ca.add_argument("--export-axolotl", metavar="FILE",
                   help="write the cache at teacher.cache (teacher.kind=cache) as an axolotl KD dataset "
                        "(JSONL: input_ids, labels, target_token_ids, logprobs) instead of building one")
    ca.add_argument("--export-distillkit", metavar="DIR",
                   help="write the cache at teacher.cache (teacher.kind=cache) as a DistillKit / open-instruct "
                        "capture (DIR/data_*.parquet + compression_config.yaml, every log-prob exact) instead of "
                        "building one")
    ca.add_argument("--distillkit-layout", metavar="YAML",
                   help="with --export-distillkit: compress as this DistillKit compression_config.yaml says "
                        "(exact values, a polynomial fit, residual bins) instead of keeping every log-prob exact")


def _eval_verb(sub):
    """eval: a student against its teacher on held-out data."""
    from stillroom.config import DataConfig, EvalConfig

    e = sub.add_parser("eval", help="compare a student with its teacher on held-out data")
    e.add_argument("--model", required=True, help="student: a run folder (its final/), a model folder, .gguf or hub id")
    e.add_argument("--teacher", help="teacher: smollm2-135m, folder, .gguf or hub id (default: the teacher the "
                                      "student was distilled from, as its stillroom.yaml says, else smollm2-135m)")
    e.add_argument("--data", required=True, help="held-out text or JSONL file")
    e.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    e.add_argument("--out", help="also write the JSON results to this file")
    config_flags(e, DataConfig, only=("seq_len", "skip_bad_rows"))   # --seq-len, --skip-bad-rows: data.*'s own
    config_flags(e, EvalConfig, only=("batch_size", "max_batches"))    # --batch-size, --max-batches: eval.*'s own
    e.add_argument("--prompt-field", help="the rows' prompt key, for rows in no known format (docs/data.md)")
    e.add_argument("--response-field", help="the rows' response key (with --prompt-field)")
    e.add_argument("--task", action="append", choices=["rouge", "exact_match"],
                   help="also score greedy answers to the rows' prompts: rouge (ROUGE-L vs the reference "
                        "answers, and the student's vs the teacher's) or exact_match (GSM8K '#### n' answers); "
                        "repeatable")
    e.add_argument("--task-rows", type=POSITIVE, default=None, help="answer at most this many rows per task")
    config_flags(e, EvalConfig, only=("max_new_tokens",), defaults={"max_new_tokens": 128})
    e.add_argument("--lm-eval", metavar="TASKS",
                   help="also run EleutherAI's lm-evaluation-harness on both models: comma-separated task names "
                        "(stillroom_facts ships with stillroom and runs offline; the standard ones need network); "
                        "needs pip install 'stillroom[lm-eval]'")
    e.add_argument("--include-path", help="a folder of your own lm-eval task YAMLs (with --lm-eval)")
    e.add_argument("--draft", action="store_true",
                   help="also time the teacher's greedy decoding alone vs with the student as its draft model "
                        "(speculative decoding): acceptance, speed ratio, and that the output is unchanged")
    e.add_argument("--draft-tokens", type=POSITIVE, default=5, help="tokens the student drafts per step (--draft)")
    config_flags(e, EvalConfig, only=("gen_tokens", "gen_prompts"))
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=commands.cmd_eval)


def _export_verb(sub):
    """export: a GGUF file."""
    x = sub.add_parser("export", help="write a student as a GGUF file (f16, q8_0, q4_0) for llama.cpp / Ollama")
    x.add_argument("model", help="a run folder (its final/) or a model folder")
    x.add_argument("--type", default="q8_0", choices=["f16", "q8_0", "q4_0"], help="weight type (default q8_0)")
    x.add_argument("--out", help="the .gguf file (default: beside the model, <name>-<type>.gguf)")
    x.add_argument("--no-check", action="store_true",
                   help="skip reading the file back (transformers, and llama.cpp if installed) to compare logits")
    x.add_argument("--json", action="store_true", help="print the result as JSON")
    x.set_defaults(func=commands.cmd_export)


def _compare_verb(sub):
    """compare: the teacher, students and their GGUF exports side by side."""
    from stillroom.config import DataConfig

    c = sub.add_parser("compare", help="teacher vs students (and their GGUF exports): size, memory, speed, quality")
    c.add_argument("teacher", help="smollm2-135m, a folder, .gguf or hub id")
    c.add_argument("students", nargs="+", help="run folders (their final/) or model folders")
    c.add_argument("--data", required=True, help="held-out text or JSONL file")
    c.add_argument("--formats", nargs="*", default=[], help="also export each student to these GGUF types "
                   "(f16 q8_0 q4_0) and measure the files in llama.cpp (needs llama-cpp-python)")
    c.add_argument("--gguf-dir", help="where the GGUF exports go (default: a temporary folder)")
    config_flags(c, DataConfig, only=("seq_len",))
    c.add_argument("--max-examples", type=POSITIVE, default=16, help="held-out examples for the quality columns")
    c.add_argument("--prefill-tokens", type=POSITIVE, default=128, help="prompt tokens of the speed test")
    c.add_argument("--new-tokens", type=POSITIVE, default=32, help="tokens generated in the speed test")
    c.add_argument("--rounds", type=POSITIVE, default=3, help="timing rounds (the median is reported)")
    c.add_argument("--prompt", action="append", help="a prompt for the side-by-side generations (repeatable)")
    c.add_argument("--draft", action="store_true",
                   help="also each student as the teacher's draft model (speculative decoding) on the prompts: "
                        "accepted tokens per teacher step, acceptance rate, speed-up, identical output")
    c.add_argument("--draft-tokens", type=POSITIVE, default=5, help="tokens the student drafts per step (--draft)")
    c.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    c.add_argument("--out", help="also write the JSON results to this file")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=commands.cmd_compare)


def _report_verb(sub):
    """report: a run's HTML page."""
    r = sub.add_parser("report", help="write <RUN_DIR>/report.html: plots, tables and config of a run")
    r.add_argument("run", help="a distill output folder")
    r.set_defaults(func=commands.cmd_report)


def _served_check_verb(sub):
    """served-check: a served teacher against the same model loaded here."""
    v = sub.add_parser("served-check", help="a served teacher against the same model loaded here, on held-out rows")
    from stillroom.config import DataConfig, ServedConfig
    config_flags(v, ServedConfig, skip=("model",))   # --url, --api, --top-k, ...: teacher.served's own keys
    v.add_argument("--served-model", help="the model name the server serves (default: --teacher)")
    v.add_argument("--teacher", default="smollm2-135m", help="the same model, loaded here: folder, .gguf, hub id "
                                                             "or smollm2-135m")
    v.add_argument("--data", required=True, help="held-out text or JSONL file")
    v.add_argument("--rows", type=POSITIVE, default=16, help="rows to score")
    config_flags(v, DataConfig, only=("seq_len",))
    v.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    v.set_defaults(func=commands.cmd_served_check)


def _generate_verb(sub):
    """generate: the teacher's answers to prompts."""
    g = sub.add_parser("generate", help="have the teacher answer prompts (JSONL conversations out, resumable)")
    g.add_argument("--out", required=True, help="output JSONL; an existing file is continued")
    from stillroom.config import GenerateConfig
    # the answering settings are GenerateConfig's (`generate.*` in a run's config), with generate's
    # own longer default answer
    config_flags(g, GenerateConfig, defaults={"max_new_tokens": 128})
    g.add_argument("--teacher", default="smollm2-135m", help="smollm2-135m (default), a folder, .gguf or hub id")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the teacher's weights (auto: bf16 where the device runs it natively, else fp32)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = g.add_argument_group("API teacher (an OpenAI-compatible endpoint instead of --teacher)")
    a.add_argument("--api", metavar="BASE_URL", help="e.g. http://127.0.0.1:8080/v1")
    a.add_argument("--api-model", default="teacher", help="the model name the endpoint serves")
    a.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    a.add_argument("--concurrency", type=POSITIVE, default=4, help="requests in flight at once")
    a.add_argument("--rate-limit", type=_number(float, low=0.0), default=0.0, help="max requests per second (0 = no cap)")
    a.add_argument("--top-logprobs", type=_number(int, low=0, high=20), default=0,
                   help="keep each token's top-K log-probs (0..20) for soft labels: stillroom cache "
                        "cache.source=logprobs")
    a.add_argument("--max-retries", type=_number(int, low=0), default=6,
                   help="retries of a failed request (exponential backoff, Retry-After honoured)")
    a.add_argument("--tokenizer", help="a model whose tokenizer counts prompt tokens (--max-prompt-tokens)")
    g.set_defaults(func=commands.cmd_generate)


def parser() -> argparse.ArgumentParser:
    from stillroom import __version__

    p = _Parser(prog="stillroom", description="Distill large language models into small ones.")
    p.add_argument("--version", action="version", version=f"stillroom {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for verbs in (_config_verbs, _eval_verb, _export_verb, _compare_verb, _report_verb, _served_check_verb,
                  _generate_verb):
        verbs(sub)
    return p


def parse(argv=None):
    """Like parse_args, but `key=value` overrides may also come after the flags
    (`stillroom distill soft --overwrite train.lr=1e-4`)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        if hasattr(args, "args") and all("=" in x and not x.startswith("-") for x in extra):
            args.args = list(args.args) + extra
        else:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    from stillroom.run.folders import process_rank

    rank = process_rank()
    # Under accelerate launch / torchrun the main process says what happens; the others, which do the
    # same, only warn (marked with their process), so a launch does not print every line N times.
    logging.basicConfig(level=logging.INFO, format="stillroom: %(message)s" if rank == 0
                        else f"stillroom [process {rank}]: %(message)s")
    if rank:
        logging.getLogger("stillroom").setLevel(logging.WARNING)
    for noisy in ("accelerate", "httpx", "httpx2", "huggingface_hub", "datasets", "openai"):   # httpx2: openai's client
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from stillroom.run.feedback import set_progress

    set_progress(not getattr(args, "no_progress", False))
    from stillroom.run.tracking import keep_cpu_memory

    logging.getLogger("stillroom").debug("CPU memory: %s", keep_cpu_memory())   # the process is ours
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():   # SIGTERM before (or after) the loop:
        signal.signal(signal.SIGTERM, on_sigterm)                # cleaned up and said, like Ctrl-C
    try:
        _quiet_libraries()
        return args.func(args)
    except UserError as e:
        print(f"stillroom: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"stillroom: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt as e:
        # Everything stillroom writes is atomic or resumable: say how to pick it up again (a run
        # interrupted inside its session is a Stopped that says so, see run/session.py).
        print(f"stillroom: stopped by {'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C'}; run the same "
              "command again to continue where it stopped", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


def entry():
    sys.exit(main())
