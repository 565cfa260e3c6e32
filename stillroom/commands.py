"""What each `stillroom` verb does, one function a verb (`cmd_<verb>`), after cli.py has parsed
its flags: the config verbs (distill, codistill, prepare, cache), eval, export, compare, report,
served-check and generate. A refusal is a UserError (one line, exit 2; cli.main prints it)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from stillroom.errors import UserError
from stillroom.run.folders import write_json

log = logging.getLogger("stillroom")


def _run_config(args, cls):
    """[CONFIG] [key=value ...] -> validated config, or None after --print-config."""
    from stillroom.recipes import is_config_path, load_config, to_yaml

    config, overrides = None, list(args.args)
    if overrides and is_config_path(overrides[0]):
        config = overrides.pop(0)
    cfg = load_config(config, overrides, cls)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None
    if args.overwrite and args.resume:
        raise UserError("--overwrite and --resume exclude each other")
    return cfg


def cmd_distill(args) -> int:
    """distill (one student) and codistill (peers): same arguments, same end (the table)."""
    from stillroom.config import CodistillRunConfig, Config

    codistill = args.command == "codistill"
    cfg = _run_config(args, CodistillRunConfig if codistill else Config)
    if cfg is None:
        return 0
    if codistill:
        from stillroom.run.codistill import codistill as run
    else:
        from stillroom.run.distill import distill as run
    result = run(cfg, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress)
    if result:
        print(result["table"])
        print(f"{'peers' if codistill else 'student'} saved to {result['final']}{'/<name>' if codistill else ''}")
    return 0


def cmd_prepare(args) -> int:
    """Tokenize a config's data into its store ahead of the run (data/store.py)."""
    from stillroom.config import CodistillRunConfig, Config
    from stillroom.data.store import load_data
    from stillroom.models import core as models

    try:
        cfg = _run_config(args, Config)
    except UserError as e:
        if "peers" not in str(e):
            raise
        cfg = _run_config(args, CodistillRunConfig)   # a co-distillation config
    if cfg is None:
        return 0
    if not cfg.data.path:
        raise UserError("stillroom prepare tokenizes data.path: set it (the default data is the teacher's "
                        "answers, made by the first run)")
    if cfg.data.store == "off":
        raise UserError("data.store=off keeps no store: nothing to prepare (set data.store=auto or a folder)")
    from stillroom.data.rows import check_source, detect_format
    for path in (cfg.data.path, cfg.data.eval_path):
        if path:
            check_source(path, detect_format(path, cfg.data.format))
    teacher = getattr(cfg, "teacher", None)
    loss = getattr(cfg, "loss", None)
    if getattr(loss, "cross_tokenizer", "none") == "uld" and cfg.student.model:
        tok = models.load_tokenizer(cfg.student.model)   # a cross-tokenizer run reads its data as the student
    elif teacher.kind == "cache":
        from stillroom.teachers.cache import TeacherCache
        tok = TeacherCache(teacher.cache).tokenizer()
    else:
        tok = models.load_tokenizer(teacher.model)
    t0 = time.perf_counter()
    train, held = load_data(cfg, tok)
    st = train.store
    print(f"{len(train):,} training / {len(held):,} held-out examples, {st.index['tokens']:,} tokens, "
          f"in {st.folder} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_cache(args) -> int:
    from stillroom.config import Config

    cfg = _run_config(args, Config)
    if cfg is None:
        return 0
    if args.distillkit_layout and not args.export_distillkit:
        raise UserError("--distillkit-layout is the layout of --export-distillkit DIR")
    if args.export_vllm or args.export_axolotl or args.export_distillkit:
        return _export_capture(cfg, args)
    if cfg.teacher.kind == "cache":
        raise UserError("stillroom cache runs the teacher: set teacher.kind=live (and teacher.model), or "
                        "teacher.kind=served (and teacher.served.url)")
    from stillroom.run.folders import check_replace, claim
    from stillroom.run.outputs import check_writable, inputs_of

    out = Path(cfg.cache.path)
    check_writable(out, "cache.path")
    with claim(out, key="cache.path"):
        if args.overwrite:
            check_replace(out, "cache", inputs_of(cfg), key="cache.path")
        return _build_cache(cfg, args)


def _export_capture(cfg, args) -> int:
    from stillroom.teachers.captures import export_capture

    asked = {f: v for f, v in (("vllm", args.export_vllm), ("axolotl", args.export_axolotl),
                                ("distillkit", args.export_distillkit)) if v}
    if len(asked) > 1:
        raise UserError(f"{', '.join('--export-' + f for f in asked)}: one capture at a time")
    (fmt, out), = asked.items()
    flag, out = f"--export-{fmt}", Path(out)
    layout = None
    if args.distillkit_layout:
        from stillroom.teachers import distillkit
        if fmt != "distillkit":
            raise UserError("--distillkit-layout is the layout of --export-distillkit")
        if not Path(args.distillkit_layout).is_file():
            raise UserError(f"--distillkit-layout {args.distillkit_layout}: no such file (a DistillKit "
                            "compression_config.yaml)")
        layout = distillkit.read_config(Path(args.distillkit_layout))
    if cfg.teacher.kind != "cache":
        raise UserError(f"{flag} writes the cache at teacher.cache: set teacher.kind=cache teacher.cache=DIR")
    if fmt == "distillkit":   # a folder
        if out.exists() and not out.is_dir():
            raise UserError(f"{flag} {out} is a file: DistillKit's capture is a folder; choose a folder")
        if out.is_dir() and any(out.iterdir()):
            if not args.overwrite:
                raise UserError(f"{flag} {out} is not empty: pass --overwrite to replace a DistillKit capture there, "
                                "or choose another folder")
            if {p.name for p in out.iterdir()} - {"compression_config.yaml"} - {p.name for p in out.glob("data_*.parquet")}:
                raise UserError(f"{flag} {out} holds files that are not a DistillKit capture's: choose another folder")
            for p in out.glob("data_*.parquet"):
                p.unlink()
    else:
        check_output_file(out, flag, [("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)])
        if out.is_file() and out.stat().st_size and not args.overwrite:
            raise UserError(f"{flag} {out} exists: pass --overwrite to replace it, or choose another file")
    n = export_capture(cfg, out, fmt, not args.no_progress, layout)
    what = {"vllm": "vLLM prompt_logprobs", "axolotl": "axolotl KD: target_token_ids + logprobs",
            "distillkit": "DistillKit: data_*.parquet + compression_config.yaml, "
                          + ("every log-prob exact" if layout is None else f"compressed as {args.distillkit_layout}")}[fmt]
    print(f"{n:,} rows of {cfg.teacher.cache} written to {out} ({what})")
    return 0


def _build_cache(cfg, args) -> int:
    from stillroom.run.cache import build_cache

    s = build_cache(cfg, args.overwrite, not args.no_progress)
    if s is None:   # another process of a launch: the main one says what was built
        return 0
    if cfg.cache.source == "logprobs":
        print(f"{s['samples']:,} samples, {s['rows']:,} positions from the API's logprobs in {cfg.cache.path}")
        return 0
    print(f"{s['samples']:,} samples, {s['rows']:,} positions, top-{s['top_k']} ({s['dtype']}): "
          f"{s['bytes'] / 2**20:.1f} MB, {s['bytes_per_token']:.0f} bytes/position, in {cfg.cache.path}")
    print(f"train from it: stillroom distill ... teacher.kind=cache teacher.cache={cfg.cache.path}")
    return 0


EVAL_KEYS = ("model", "teacher", "data", "eval")    # what `eval --out` writes (check_output_file)
COMPARE_KEYS = ("columns", "generations")           # what `compare --out` writes


def cmd_eval(args) -> int:
    from stillroom.models import core as models

    dcfg, ecfg, items, harness_tasks = _eval_inputs(args)   # every refusal before a model is loaded
    model = models.run_model(args.model)
    teacher_spec = args.teacher or _run_teacher(model) or "smollm2-135m"
    log.debug("student %s, teacher %s", model, teacher_spec)
    student, teacher, vocab, cross = _eval_models(args, model, teacher_spec)
    result = {"model": args.model, "teacher": teacher_spec, "data": args.data,
              **_eval_measure(args, dcfg, ecfg, items, harness_tasks, student, teacher, vocab, cross)}
    if args.out:
        write_json(Path(args.out), result, indent=2)   # atomic: a reader never sees half of it
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"student {model} vs teacher {teacher_spec}, on {args.data}")
        _print_eval(result, ecfg)
    return 0


def _eval_inputs(args):
    """`eval`'s flags checked, before any model is loaded -> (data config, eval config, the
    generation tasks' rows, lm-eval's tasks or None)."""
    from stillroom.config import DataConfig, EvalConfig
    from stillroom.eval import harness, tasks

    # --task-rows means "at most" (None: every row), where eval.task_rows is a number: not the section's
    ecfg = flag_section(args, EvalConfig, "eval", task_rows=args.task_rows or EvalConfig().task_rows)
    if args.response_field and not args.prompt_field:
        raise UserError("--response-field needs --prompt-field")
    fields = {"prompt": args.prompt_field, "response": args.response_field} if args.prompt_field else None
    dcfg = flag_section(args, DataConfig, "data", path=args.data, fields=fields)
    if not Path(args.data).exists():
        raise UserError(f"data file not found: {args.data}")
    if args.out:
        check_output_file(args.out, "--out", [("--data", args.data)], EVAL_KEYS)
    items = {t: tasks.read_items(args.data, t, args.task_rows, fields) for t in dict.fromkeys(args.task or [])}
    harness_tasks = [t.strip() for t in (args.lm_eval or "").split(",") if t.strip()]
    if args.include_path and not harness_tasks:
        raise UserError("--include-path names where --lm-eval finds tasks: pass --lm-eval TASKS too")
    return dcfg, ecfg, items, harness.task_dict(harness_tasks, args.include_path) if harness_tasks else None


def _eval_models(args, model: str, teacher_spec: str):
    """The student and the teacher, loaded, on the GPU when there is one, checked against each
    other -> (student, teacher, their shared logit width (None across tokenizers), across tokenizers?)."""

    from stillroom.models import core as models
    from stillroom.models import running

    student, teacher = models.load(model), models.load(teacher_spec)
    device = running.best_device()   # both models where they run fastest
    student.model.to(device)
    teacher.model.to(device)
    cross = not models.same_tokenizer(student.tokenizer, teacher.tokenizer)
    vocab = None
    if cross and args.draft:
        raise UserError("--draft needs a student with the teacher's tokenizer (the teacher verifies the "
                        "student's drafted tokens); this student's tokenizer differs")
    if cross:   # each model in its own tokens, on the same text: bits per byte compare them
        log.warning("the student's tokenizer differs from the teacher's: each model is measured in its own "
                    "tokens on the same text; bits per byte compare them (per-token perplexities do not), and "
                    "agreement and KL do not exist across vocabularies")
    else:
        vocab, note = models.check_vocab(teacher.model, teacher.tokenizer, student.model, student.tokenizer)
        if note:
            log.warning(note)
    for who, m in (("teacher", teacher.model), ("student", student.model)):
        models.check_context(args.seq_len, m.config, who, f"--seq-len {args.seq_len}")
        models.check_context(args.gen_tokens, m.config, who, f"--gen-tokens {args.gen_tokens}")
    return student, teacher, vocab, cross


def _eval_measure(args, dcfg, ecfg, items, harness_tasks, student, teacher, vocab, cross) -> dict:
    """The evaluation table's columns on the held-out examples (in the student's tokens), and what
    the flags add: the draft check, the generation tasks, lm-eval."""
    from stillroom.data.examples import build_examples
    from stillroom.eval import evaluate, harness
    from stillroom.teachers.core import LiveTeacher

    tok = student.tokenizer if cross else teacher.tokenizer   # (the same vocabulary unless cross)
    examples, _ = build_examples(args.data, tok, dcfg)
    columns, tokens = evaluate.columns(student.model, LiveTeacher(teacher.model, path=teacher.path), examples, ecfg,
                                       vocab, tok, t_tok=teacher.tokenizer if cross else None,
                                       student_path=student.path)
    found = {"held_out_tokens": tokens, "eval": columns}
    if args.draft:
        from stillroom.eval import draft
        found["draft"] = draft.draft_check(teacher.model, student.model, evaluate.speed_prompts(examples, ecfg.gen_prompts),
                                           ecfg.gen_tokens, tok.pad_token_id, args.draft_tokens)
    if items:
        found["tasks"] = _eval_tasks(args, items, teacher, student, Path(args.out) if args.out else None)
    if harness_tasks:
        found["lm_eval"] = harness.run(harness_tasks, {"teacher": (teacher.model, teacher.tokenizer),
                                                       "student": (student.model, student.tokenizer)},
                                       args.batch_size, progress=not args.no_progress)
    return found


def _print_eval(result: dict, ecfg):
    from stillroom.eval import evaluate, harness, tasks

    print(evaluate.table(result["eval"], result["held_out_tokens"]))
    if "draft" in result:
        from stillroom.eval import draft
        print(f"\nthe student as the teacher's draft model (speculative decoding, {ecfg.gen_tokens} new tokens "
              f"per prompt):\n{draft.table(result['draft'])}")
    if "lm_eval" in result:
        print(f"\nlm-evaluation-harness:\n{harness.table(result['lm_eval'])}")
    for task, got in result.get("tasks", {}).items():
        print(f"\ntask {task}:\n{tasks.table(got['scores'], got['rows'])}")
        print(f"each row's answers: {got['answers']}" if got["answers"] else
              "(pass --out FILE.json to keep each row's answers beside it)")


def _eval_tasks(args, items: dict, teacher, student, out: Path | None) -> dict:
    """The generation tasks of `stillroom eval --task`: scores per model, each row's answers
    written to <out>.<task>.jsonl beside --out."""
    from stillroom.eval import tasks

    both = {"teacher": (teacher.model, teacher.tokenizer), "student": (student.model, student.tokenizer)}
    found = {}
    for task, rows in items.items():
        said = tasks.answer_all(rows, both, args.max_new_tokens, args.batch_size, not args.no_progress, f"{task}: ")
        found[task] = tasks.result(task, rows, said, args.max_new_tokens,
                                   out.with_name(f"{out.stem}.{task}.jsonl") if out else None)
    return found


def _run_teacher(model_dir: str) -> str | None:
    """The teacher a stillroom student was distilled from (its stillroom.yaml), if it names one
    that is still there (a folder or file) or a bundled one."""
    import yaml

    from stillroom.models.core import BUNDLED

    f = Path(model_dir) / "stillroom.yaml"
    try:
        t = (yaml.safe_load(f.read_text()) or {}).get("teacher", {}).get("model")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return t if isinstance(t, str) and (t in BUNDLED or Path(t).exists()) else None


def cmd_export(args) -> int:
    from stillroom.deploy.export import export

    res = export(args.model, args.out, args.type, verify=not args.no_check)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"wrote {res['file']} ({args.type}, {res['bytes'] / 2**20:.1f} MB, {res['params']:,} params)")
    for who in ("transformers", "llama_cpp"):
        c = res.get("check", {}).get(who)
        if c and "error" in c:
            print(f"  llama.cpp could not load it: {c['error']}")
            return 1
        if c:
            print(f"  read back by {who.replace('_', '.')}: KL {c['kl_per_token']:.5f}/token vs the PyTorch model, "
                  f"top-1 agreement {c['top1_agreement']:.1%}, max logit diff {c['max_abs_logit_diff']:.3f} "
                  f"({res['check']['tokens']} tokens)")
    if "check" in res and res["check"].get("llama_cpp") is None:
        print("  (llama-cpp-python is not installed: checked with transformers only)")
    return 0


def cmd_compare(args) -> int:
    from stillroom.config import DataConfig
    from stillroom.deploy.compare import compare, render

    seq_len = flag_section(args, DataConfig, "data", path=args.data).seq_len   # --seq-len: data.seq_len's own
    if args.out:
        check_output_file(args.out, "--out", [("--data", args.data)], COMPARE_KEYS)
    res = compare(args.teacher, args.students, args.data, args.formats, seq_len, args.max_examples,
                  args.prefill_tokens, args.new_tokens, args.rounds, args.prompt or None, args.gguf_dir,
                  progress=not args.no_progress, draft_tokens=args.draft_tokens if args.draft else 0)
    if args.out:
        write_json(Path(args.out), res, indent=2)   # atomic: a reader never sees half of it
    print(json.dumps(res, indent=2) if args.json else render(res))
    return 0


def cmd_report(args) -> int:
    from stillroom.eval.report import write

    print(f"wrote {write(Path(args.run))}")
    return 0


def cmd_served_check(args) -> int:
    from stillroom.config import DataConfig, ServedConfig
    from stillroom.teachers.served import check_against_local, check_table

    if not args.url:
        raise UserError("served-check needs --url: the server's base URL, e.g. http://127.0.0.1:8000/v1")
    scfg = flag_section(args, ServedConfig, "served", model=args.served_model)   # its flags: config_flags
    seq_len = flag_section(args, DataConfig, "data", path=args.data).seq_len
    got = check_against_local(scfg, args.teacher, args.data, args.rows, seq_len, progress=not args.no_progress)
    print(json.dumps(got, indent=1) if args.json else check_table(got))
    return 0


def cmd_generate(args) -> int:
    from stillroom.config import GenerateConfig
    from stillroom.teachers.generate import read_prompts

    gcfg = flag_section(args, GenerateConfig, "generate")   # its flags: config_flags
    check_output_file(args.out, "--out", [("--prompts", args.prompts), ("--tokenizer", args.tokenizer)])
    prompts = read_prompts(gcfg.prompts, gcfg.num_prompts, gcfg.prompt_field, gcfg.split, gcfg.system, gcfg.dedup)
    if args.top_logprobs and not args.api:
        raise UserError("--top-logprobs is for --api teachers (a local teacher's full distributions "
                        "are cached with `stillroom cache`)")
    from stillroom.run.folders import claim

    out = Path(args.out)
    with claim(out.parent, key="--out", name=out.name):   # one writer per answers file, refused at once
        r = _generate(args, gcfg, prompts, out)
    if not r:   # another process of a launch: the main one writes the file and says so
        return 0
    notes = [f"{r['skipped']} prompts skipped (too long)" if r["skipped"] else "",
             f"{r['empty']} empty answers dropped" if r["empty"] else "",
             f"{r['truncated']} answers cut at --max-new-tokens {gcfg.max_new_tokens} (marked truncated)"
             if r["truncated"] else "",
             f"{r['dropped_turns']} follow-up turns not asked (an earlier answer in their conversation was cut, "
             "empty, or the next turn would not fit)" if r.get("dropped_turns") else ""]
    notes = "; ".join(n for n in notes if n)
    print(f"{r['rows']} conversations for {r['prompts']} prompts in {r['path']}" + (f"; {notes}" if notes else ""))
    return 0


def _generate(args, gcfg, prompts, out: Path) -> dict:
    from stillroom.models import core as models
    from stillroom.models import running
    from stillroom.run.tracking import launch_state
    from stillroom.teachers.generate import LocalTeacher, generate_file

    state, device = launch_state()
    if args.api:
        from stillroom.teachers.api import ApiTeacher

        tok = models.load_tokenizer(args.tokenizer) if args.tokenizer else None
        teacher = ApiTeacher(args.api, args.api_model, args.api_key_env, args.concurrency, args.rate_limit,
                             args.top_logprobs, max_retries=args.max_retries, tokenizer=tok)
    else:
        loaded = models.load(args.teacher, dtype=running.teacher_dtype(args.dtype, device))
        loaded.model.to(device)
        teacher = LocalTeacher(loaded.model, loaded.tokenizer, args.teacher)
    return generate_file(teacher, prompts, out, gcfg, progress=not args.no_progress, state=state)


def check_output_file(path, flag: str, inputs=(), keys=None):
    """Before any work: a file to write must not be a folder, nor one of the command's `inputs`
    ((flag, path) pairs; paths compared resolved, symlinks included), nor an existing file this
    command did not write (`keys`: the top-level keys of the JSON it writes; None: not checked);
    its folder must be writable."""
    from stillroom.run.outputs import check_writable

    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file path (e.g. {p}/NAME)")
    if p.exists() and not p.is_file():   # a device (/dev/null), a pipe: results are written by renaming a file
        raise UserError(f"{flag} {path} is not a regular file (a device, pipe or socket): give a file path")
    for what, given in inputs:
        if given and Path(given).is_file() and Path(given).resolve() == p.resolve():
            raise UserError(f"{flag} {path} is the {what} file this command reads: writing it would destroy "
                            f"it; choose another {flag}")
    if keys is not None and p.is_file() and p.stat().st_size and not _written_by(p, keys):
        raise UserError(f"{flag} {path} exists and is not a result this command wrote: it would be replaced; "
                        f"choose another {flag} or remove that file")
    check_writable(p.parent if str(p.parent) else Path("."), f"{flag} {path}: its folder")


def _written_by(path: Path, keys) -> bool:
    """Is the file a JSON object with these top-level keys (a result of the command that writes it)?"""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and set(keys) <= set(obj)


def flag_section(args, cls, section: str, **given):
    """The config section a verb's flags fill (config_flags), validated by the section itself; an
    error names the flag the user typed (`--top-k: ...`, where a validator says `<section>.top_k`).
    given: fields set otherwise (a flag of another name)."""
    from stillroom.recipes import validate

    raw = {**{k: getattr(args, k) for k in cls.model_fields if hasattr(args, k)}, **given}
    try:
        return validate(raw, cls)
    except UserError as e:
        msg = str(e)
        for n in sorted(raw, key=len, reverse=True):
            flag = "--" + n.replace("_", "-")
            msg = msg.replace(f"config key '{n}'", flag).replace(f"{section}.{n}", flag)
        raise UserError(msg) from None
