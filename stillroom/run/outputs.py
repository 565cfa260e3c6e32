"""What a run writes and how: checkpoints (atomic, rotated), the training log's trimming on
resume, the final folder (swapped in atomically), and the checks on an output folder made before
any heavy work. Shared by distill, codistill and the commands that write model folders."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from stillroom.recipes import to_yaml
from stillroom.errors import UserError, write_failure
from stillroom.run import faults, folders, shard

STEP_DIR = re.compile(r"step_(\d+)")


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first: `step_N` folders holding trainer_state.json (written
    last, inside the temporary folder, before the rename). Temporary (`.tmp`) and condemned
    (`.old`) folders never count."""
    d = out / "checkpoints"
    found = [p for p in d.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "trainer_state.json").is_file()] \
        if d.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def damage(ckpt: Path) -> str | None:
    """Why a complete checkpoint cannot be trusted, in a few words (None: it is as written): its
    trainer_state.json does not parse, or a file differs from the size and CRC-32 recorded in it
    when the checkpoint was marked complete (checkpoints written before the record was added are
    checked for the first only)."""
    try:
        state = read_state(ckpt)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return "trainer_state.json holds no step"
    except (OSError, ValueError) as e:
        return f"trainer_state.json cannot be read ({type(e).__name__})"
    try:
        return folders.damage(ckpt, state.get("files") or {})
    except OSError as e:
        return f"a file cannot be read ({e.strerror})"


def damaged_checkpoints(out: Path) -> list[tuple[Path, str]]:
    """--resume, before anything loads (read only): the checkpoints newer than the newest intact
    one, each with why it cannot be used; none intact is one line."""
    said = []
    for ckpt in reversed(checkpoints(out)):
        why = damage(ckpt)
        if why is None:
            return said
        said.append((ckpt, why))
    raise UserError(f"--resume: no intact checkpoint in {out}/checkpoints "
                    f"({'; '.join(f'{c.name}: {why}' for c, why in said)}): start the run again with --overwrite")


def set_aside(damaged: list[tuple[Path, str]]):
    """Rename each damaged checkpoint `step_N.damaged` (kept for inspection, never used or rotated;
    its step can be written again), with a line saying why (main process, once the run is
    validated: a refused --resume changes nothing)."""
    for ckpt, why in damaged:
        aside, n = ckpt.with_name(ckpt.name + ".damaged"), 1
        while aside.exists():
            aside, n = ckpt.with_name(f"{ckpt.name}.damaged{n}"), n + 1
        os.replace(ckpt, aside)
        logging.getLogger("stillroom").warning("--resume: checkpoint %s is damaged (%s); set aside as %s, "
                                               "resuming from an earlier one", ckpt.name, why, aside.name)


def save_checkpoint(accelerator, out: Path, step: int, keep: int, write=None, state=None):
    """Atomic: written under a temporary name and renamed when complete, so a crash at any moment
    leaves either the previous checkpoints or those plus this one. Older ones beyond `keep` are
    first renamed away (`.old`), then deleted: a crash mid-delete never leaves a half-deleted
    checkpoint that looks complete, and the newest complete one is never touched. `write(tmp)`
    runs on every process (default: Accelerate's save_state). `state` is stored beside the step.
    A full disk removes the partial folder and says so in one line (previous checkpoints intact)."""
    final = out / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if write is None:
            with tied_weights_quiet():
                accelerator.save_state(str(tmp))
        else:
            write(tmp)
        accelerator.wait_for_everyone()
        if main:
            faults.point("checkpoint.written")          # files in tmp, not yet marked complete
            folders.usual_mode(tmp)
            files = folders.checksums(tmp)              # what --resume verifies before it trusts them
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(state or {}), "files": files}))
            faults.point("checkpoint.complete")         # complete in tmp, not yet renamed
            folders.durable_replace(tmp, final)         # on the disk before it is published
    except Exception as e:
        why = write_failure(e, tmp.parent)   # asked before the partial folder frees its space
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        have = checkpoints(out)
        raise UserError(f"could not write checkpoint step {step} to {tmp}: {why}; " +
                        (f"the last complete checkpoint ({have[-1].name}) is intact: free space and rerun with "
                         "--resume" if have else "no earlier checkpoint exists: free space and rerun")) from None
    if main:
        faults.point("checkpoint.renamed")
        for old in checkpoints(out)[:-keep]:
            gone = old.with_name(old.name + ".old")
            os.replace(old, gone)
            faults.point("checkpoint.rotating")
            shutil.rmtree(gone, ignore_errors=True)
        for stale in out.glob("checkpoints/*.old"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


class _SharedTensorNote(logging.Filter):
    def filter(self, record):
        return "Removed shared tensor" not in str(record.msg)


def save_trainees(tmp: Path, trainees, accelerator):
    """What a checkpoint holds of the trainees, on every process. Sharded (FSDP2): each process
    writes its shards of each trainee (torch.distributed.checkpoint), under <name>/ for a peer.
    Distill's one student: Accelerate's save_state (its model, optimizer, the objective's modules,
    the schedule and the random states). Peers: <name>.pt (weights, optimizer, schedule, snapshot),
    written by the main process for replicated peers and by its owner for the others."""
    for tr in trainees:
        if shard.is_sharded(tr.model):
            shard.save(tmp / (tr.name or ""), _modules(tr), tr.optimizer, tr.scheduler, accelerator.is_main_process)
        elif tr.name is None:
            with tied_weights_quiet():
                accelerator.save_state(str(tmp))
        elif accelerator.is_main_process or not tr.replicated:
            torch.save({"model": accelerator.unwrap_model(tr.model).state_dict(), "optimizer": tr.optimizer.state_dict(),
                        "scheduler": tr.scheduler.state_dict(), "snapshot": tr.snapshot}, tmp / f"{tr.name}.pt")


def load_trainees(path: Path, trainees, accelerator):
    """The trainees' state from a checkpoint save_trainees wrote."""
    for tr in trainees:
        if shard.is_sharded(tr.model):
            where = path / (tr.name or "")
            if not (where / "sharded").is_dir():
                raise UserError(f"--resume: checkpoint {path} has no sharded state" + (
                    f" for peer '{tr.name}'" if tr.name else "") + " (was it written without train.shard=fsdp"
                    + (", or were the peers renamed?)" if tr.name else "?)"))
            shard.load(where, _modules(tr), tr.optimizer, tr.scheduler)
        elif tr.name is None:
            accelerator.load_state(str(path))
        else:
            f = path / f"{tr.name}.pt"
            if not f.is_file():
                raise UserError(f"--resume: checkpoint {path} has no state for peer '{tr.name}' (were the peers renamed?)")
            state = torch.load(f, map_location="cpu", weights_only=False)  # load_state_dict moves it
            accelerator.unwrap_model(tr.model).load_state_dict(state["model"])
            tr.optimizer.load_state_dict(state["optimizer"])
            tr.scheduler.load_state_dict(state["scheduler"])
            tr.snapshot = ({k: v.to(accelerator.device) for k, v in state["snapshot"].items()}
                           if state["snapshot"] is not None else None)


def _modules(tr):
    """What a sharded trainee's optimizer was made over: distill's student with the objective's
    modules, or a peer alone."""
    return torch.nn.ModuleList([tr.model, *tr.extra]) if tr.name is None else tr.model


@contextlib.contextmanager
def tied_weights_quiet():
    """Accelerate's save_state stores a tied output head once (safetensors cannot hold a tensor
    twice) and warns "Removed shared tensor {'lm_head.weight'} ... check by verifying that you
    don't receive any warning while reloading" at every checkpoint. Its load_state ties it again
    (safetensors.load_model), and the resume tests check the resumed run bit for bit, so the
    warning is dropped rather than shown at every checkpoint."""
    logger = logging.getLogger("accelerate.utils.other")
    f = _SharedTensorNote()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def trim_metrics(path: Path, step: int):
    """On resume: drop log lines beyond the checkpoint's step (written after it, before a crash),
    so the log reads as one run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue   # a line torn by a crash
        at = rec.get("step", rec.get("eval", {}).get("step", 0))
        if at <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    folders.durable_replace(tmp, path)


def publish(out: Path, name: str, write, what: str) -> Path:
    """<out>/<name>, replaced atomically: `write(tmp)` fills <name>.tmp, which is then swapped in
    (the previous folder renamed to <name>.old first), so a crash at any moment keeps the previous
    folder or the new one, never half of either. A failed write (a full disk) removes the partial
    folder and says so in one line."""
    final, tmp, old = out / name, out / f"{name}.tmp", out / f"{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except Exception as e:
        why = write_failure(e, out)
        shutil.rmtree(tmp, ignore_errors=True)
        have = checkpoints(out)
        raise UserError(f"could not write {what} to {tmp}: {why}; " +
                        (f"checkpoint {have[-1].name} is intact: free space and rerun with --resume"
                         if have else "free space and rerun")) from None
    faults.point("final.written")
    folders.usual_mode(tmp)
    folders.fsync_tree(tmp)              # every file on the disk before the swap publishes it
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    folders.durable_replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_final(out: Path, student, tokenizer, cfg, metrics: dict, generation_config=None, extra=None):
    """<out>/final: loadable by AutoModelForCausalLM/AutoTokenizer, plus config and metrics
    (published atomically, see `publish`). extra(folder) writes more files into it (the
    hidden-state projections)."""
    if generation_config is not None:
        student.generation_config = copy.deepcopy(generation_config)

    def write(tmp):
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "stillroom.yaml").write_text(to_yaml(cfg))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if extra is not None:
            extra(tmp)
        if (out / "metrics.jsonl").exists():
            shutil.copy(out / "metrics.jsonl", tmp / "metrics.jsonl")
    return publish(out, "final", write, "the final student")


def check_writable(out: Path, what="output folder"):
    """The folder can be created and written (checked on its nearest existing ancestor), before
    any heavy work, leaving nothing behind (an empty folders.PROBE* folder for a moment)."""
    probe = Path(out)
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():   # a link whose target is gone: nothing could be made at its name
            raise UserError(f"{what} {out}: {probe} is a symlink to {os.readlink(probe)}, which does not exist; "
                            "create its target or pick another path")
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {out}: {probe} is a file, not a folder; pick another path")
    import tempfile
    try:   # permission bits do not stop root, and read-only mounts can say "writable": try it
        os.rmdir(tempfile.mkdtemp(prefix=folders.PROBE, dir=probe))
    except OSError as e:
        raise UserError(f"{what} {out}: cannot write in {probe} ({e.strerror}); pick another path") from None


RUN_KINDS = {"run": "distill", "codistill run": "codistill"}   # a run folder's marker kind -> its command


def prepare_output(out: Path, overwrite: bool, resume: bool, inputs=(), kind: str = "run"):
    """Refuse to clobber a previous run unless asked, and to let --overwrite delete anything
    stillroom did not make or any of the command's `inputs`; runs before any heavy work."""
    check_writable(out)
    if resume:
        found = folders.kind_of(out) if (out / folders.MARKER).is_file() else None
        if found in RUN_KINDS and found != kind:
            raise UserError(f"--resume: {out} is a {RUN_KINDS[found]} run: resume it with stillroom "
                            f"{RUN_KINDS[found]}")
        if not checkpoints(out):
            raise UserError(f"--resume: no complete checkpoint in {out}/checkpoints "
                            "(set train.save_every to write some)")
        return
    if not folders.is_main_process():
        return   # the main process decides: by the time another looks, the main one's writes are there
    if folders.entries(out) and not overwrite:
        raise UserError(f"output folder {out} already exists; pass --overwrite to replace it "
                        "or --resume to continue it")
    if overwrite:
        folders.check_replace(out, kind, inputs)


@contextlib.contextmanager
def own_output(out: Path, overwrite: bool, resume: bool, inputs=(), kind: str = "run"):
    """`with own_output(...):` a run's whole life: the folder checked (prepare_output) and
    locked against a second command (folders.claim) until the run ends."""
    check_writable(out)
    with folders.claim(out):
        prepare_output(out, overwrite, resume, inputs, kind)
        yield


def start_output(out: Path, overwrite: bool, resume: bool, kind: str = "run"):
    """The first write of a validated run (main process): an --overwrite empties the folder
    (prepare_output allowed it), and the folder is marked as a stillroom run of its `kind`."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        folders.clear(out, kind)
    elif not (out / folders.MARKER).exists():
        folders.mark(out, kind)


def inputs_of(cfg) -> list[str]:
    """The local paths a run reads (data, teacher, student or peers, cache, fine-tuning data)."""
    found = []
    for section, key in (("data", "path"), ("data", "eval_path"), ("teacher", "model"), ("teacher", "cache"),
                         ("student", "model"), ("finetune", "data")):
        v = getattr(getattr(cfg, section, None), key, None)
        found.append(v)
    found += [getattr(p, "model", None) for p in getattr(cfg, "peers", None) or []]
    return [v for v in found if isinstance(v, str) and v and Path(v).exists()]


# On resume, settings that cannot change what the run computes: how it logs, evaluates, saves,
# reports and uses the machine. Anything else that differs from the run's config is refused.
HARMLESS = {"train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
            "train.report_to", "train.threads", "train.prefetch", "train.max_bad_steps", "train.output_dir",
            "teacher.offload", "eval.max_batches", "eval.batch_size", "eval.gen_tokens", "eval.gen_prompts",
            "data.store", "data.workers", "train.gradient_checkpointing"}


def flat(d, prefix=""):
    """A nested config dict -> {dotted key: value} (an empty dict is a value)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def resume_changes(out: Path, cfg) -> dict:
    """--resume: the config keys that differ from the run's own (its config.yaml), as
    {key: [then, now]}, when each is one that cannot change what the run computes (HARMLESS, or
    train.max_steps raised to extend the run); any other difference is refused in one line."""
    import yaml

    saved = out / "config.yaml"
    if not saved.is_file():
        return {}
    then, now = flat(yaml.safe_load(saved.read_text())), flat(yaml.safe_load(to_yaml(cfg)))
    diff = {k: [then.get(k), now.get(k)] for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}

    def harmless(k, a, b):
        return k in HARMLESS or (k == "train.max_steps" and isinstance(a, int) and isinstance(b, int) and b >= a)

    def said(k, a, b):   # a key the run's config lacks was added to stillroom after the run began
        return f"{k} (not in its config.yaml: a setting newer than the run) -> {b!r}" if k not in then \
            else f"{k} {a!r} -> {b!r}"

    refused = [said(k, a, b) for k, (a, b) in diff.items() if not harmless(k, a, b)]
    if refused:
        raise UserError(f"--resume: {out} was trained with other settings ({'; '.join(refused)}); they change "
                        "what the run computes: resume with the run's values, or start a new run in another "
                        "train.output_dir")
    return diff


DATA_KEYS = (("data", "path"), ("data", "eval_path"), ("finetune", "data"))
WHOLE = 64 << 20   # files up to this size are hashed whole; larger ones by 64 blocks of 64 KB, evenly spread


def content_key(path: Path) -> str:
    """A hash of a file's content and size: the whole file up to 64 MB; beyond, 64 blocks of 64 KB
    spread evenly from its first byte to its last (an edit that keeps the size and misses every
    block is not seen: the cost of not reading a 100 GB corpus at every resume)."""
    import hashlib

    h, size = hashlib.sha1(), path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= WHOLE:
            while piece := f.read(1 << 24):
                h.update(piece)
        else:
            for i in range(64):
                f.seek((size - (1 << 16)) * i // 63)
                h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


def data_fingerprints(cfg) -> dict:
    """{config key: content key} of the local data a run trains on (a folder: of every file under
    it); hub ids and absent keys are left out."""
    found = {}
    for section, key in DATA_KEYS:
        v = getattr(getattr(cfg, section, None), key, None)
        if not (isinstance(v, str) and v and Path(v).exists()):
            continue
        p = Path(v)
        found[f"{section}.{key}"] = content_key(p) if p.is_file() else \
            {str(f.relative_to(p)): content_key(f) for f in sorted(p.rglob("*")) if f.is_file()}
    return found


def check_same_data(out: Path, now: dict):
    """--resume: refuse in one line when a data file at the run's path holds other content than
    when the run began (recorded in its inputs.json; a run begun before the record is not checked)."""
    try:
        then = json.loads((out / "inputs.json").read_text())
    except (OSError, ValueError):
        return
    changed = [k for k in now if k in then and then[k] != now[k]]
    if changed:
        raise UserError(f"--resume: the data changed since the run began ({', '.join(changed)}: other content at "
                        "the same path); resume with the original data, or start a new run in another "
                        "train.output_dir")


def record_resume(out: Path, changes: dict):
    """Main process, on resume: log the allowed changes (resume_changes), also as a metrics.jsonl
    record at the step the run resumes from."""
    import logging

    if changes:
        step = read_state(checkpoints(out)[-1])["step"]
        logging.getLogger("stillroom").warning(
            "resume: changed from step %d: %s", step, ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "config_changed": changes}) + "\n")
