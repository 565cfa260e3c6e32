"""Which method wins, measured fairly: every arm from the same student init, on the same number of
training tokens, with the same optimizer, scored on held-out rows no arm trains on.

    python bench/quality.py [--steps 40] [--seeds 3] [--arms ce,soft,...] [--json out.json]
    python bench/quality.py --arms dml --dml "recipe:teacher_weight=0.5,confidence=true" --dml-seeds 3

Protocol (issue 17):
- Data: Alpaca instructions from ../shared/data. The last --held rows are the held-out set: held-out
  perplexity / bits per byte / agreement / KL on them (data.eval_path) and ROUGE-L of greedy
  answers on the first --task-rows of them (eval.tasks). The first --train-rows rows train.
- Every arm: the same student (the teacher's --layers layers cut once, saved, and loaded by every
  arm as student.init=pretrained), data.pack=true so each step is exactly --batch x --seq tokens,
  --steps steps, the same lr / warmup / clipping; seeds 0..--seeds-1 for CE, soft KD and sequence
  KD (one seed, 0, for the other arms, to fit the budget).
- Arms: ce (gold labels, no teacher), seqkd (CE on the teacher's own greedy answers to the training
  prompts, generated once), soft (forward KL, alpha 0.9), hard (teacher argmax), reverse_kl,
  jsd (beta 0.5), on_policy (JSD with half the steps on the student's samples), cache (soft KD
  from a top-64 cache built once), hidden (soft KD + hidden-state cosine), dml (two peers cut from
  the teacher at different layers, co-distilled, against the same two peers trained alone with CE
  and, where a --dml variant gives the teacher a weight, alone with that share of soft KD;
  --dml-seeds seeds of it all, compared seed by seed; --arms dml alone runs no ce arm: peer a alone
  with CE is then the reference), ensemble (the two CE-alone peers of seed 0 as an equal-weight
  multi-teacher for a fresh student, Anil et al.'s control for DML; its agreement, KL and ROUGE-L
  vs the teacher re-measured against SmolLM2), ce_time and ce_time_cache (CE given the wall time of
  soft KD live and from the cache: more steps, the same batch: does the teacher's cost pay for
  itself?).
- Printed: mean +/- std over seeds; the fraction of the teacher gap closed per metric,
  (arm - CE) / (teacher - CE); training wall time relative to CE (ratios only: the machine is noisy).

Budget: with the defaults, 28-30 min on a 2-core AVX512-BF16 CPU (19 training runs of 20-120 s plus
their evaluations, the teacher's answers once (3 min) and the cache once); --steps / --seq /
--train-rows / --seeds scale it.
"""
from __future__ import annotations

import sys
import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = SHARED / "alpaca_subset" / "alpaca_4500.jsonl"

ARMS = {
    "ce": ["loss.alpha=0.0"],
    "seqkd": ["loss.alpha=0.0", "SEQKD"],
    "soft": [],
    "hard": ["loss.kind=hard"],
    "reverse_kl": ["loss.divergence=reverse_kl"],
    "jsd": ["loss.divergence=jsd", "loss.beta=0.5"],
    # on-policy rewrites each example from its prompt, so it cannot pack: its off-policy steps see
    # one row per example (fewer tokens than a packed step), its on-policy steps the student's samples
    "on_policy": ["loss.divergence=jsd", "loss.beta=0.5", "loss.on_policy=0.5", "loss.on_policy_tokens=32",
                  "data.pack=false"],
    "cache": ["CACHE"],
    "hidden": ["loss.terms={ce: 0.1, forward_kl: 0.9, hidden_cosine: 0.2}"],
    "dml": ["DML"],
    "ensemble": ["ENSEMBLE"],
    "ce_time": ["loss.alpha=0.0", "TIME:soft"],
    "ce_time_cache": ["loss.alpha=0.0", "TIME:cache"],
}
SEEDED = ("ce", "soft", "seqkd")
METRICS = [("perplexity", "held-out perplexity", False), ("bits_per_byte", "bits per byte", False),
           ("agreement", "top-1 agreement", True), ("kl_per_token", "KL(teacher||student)/token", False),
           ("rougeL", "ROUGE-L vs references", True), ("rougeL_vs_teacher", "ROUGE-L vs the teacher", True)]


def write_rows(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def base(args, work: Path, out: Path, seed: int, steps: int | None = None) -> list[str]:
    return [f"data.path={work / 'train.jsonl'}", f"data.eval_path={work / 'held.jsonl'}", "data.pack=true",
            f"data.seq_len={args.seq}", "student.init=pretrained", f"student.model={work / 'init'}",
            f"train.max_steps={steps or args.steps}", f"train.batch_size={args.batch}", f"train.lr={args.lr}",
            "train.warmup_steps=4", f"train.log_every={steps or args.steps}", f"train.seed={seed}",
            "loss.alpha=0.9", f"train.output_dir={out}", "teacher.model=smollm2-135m",
            "eval.tasks=[rouge]", f"eval.task_data={work / 'held.jsonl'}", f"eval.task_rows={args.task_rows}",
            f"eval.max_new_tokens={args.new_tokens}", "eval.gen_prompts=1", "eval.gen_tokens=4"]


def result(metrics: dict, wall: float) -> dict:
    s, t = metrics["eval"]["student after"], metrics["eval"]["teacher"]
    task = (metrics.get("tasks") or {}).get("rouge", {}).get("scores", {})
    row = {k: s.get(k) for k in ("perplexity", "bits_per_byte", "agreement", "kl_per_token")}
    row.update(rougeL=task.get("student after", {}).get("rougeL"),
               rougeL_vs_teacher=task.get("student after", {}).get("rougeL_vs_teacher"),
               train_s=metrics["train"].get("elapsed_s"), wall_s=wall)
    teacher = {"perplexity": t.get("perplexity"), "bits_per_byte": t.get("bits_per_byte"), "agreement": 1.0,
               "kl_per_token": 0.0, "rougeL": task.get("teacher", {}).get("rougeL"), "rougeL_vs_teacher": 1.0}
    return {"row": row, "teacher": teacher}


def prepare(args, work: Path, arms: list[str]):
    """The data split, the shared student init, and (once, for the arms that read them) the
    teacher's answers to the training prompts and the top-64 cache."""
    from stillroom.config import Config, StudentConfig
    from stillroom.recipes import load_config
    from stillroom.models import core as models
    from stillroom.run.cache import build_cache
    from stillroom.teachers.generate import LocalTeacher, generate_file, read_prompts

    rows = [json.loads(x) for x in ALPACA.read_text().splitlines() if x.strip()]
    write_rows(work / "train.jsonl", rows[:args.train_rows])
    write_rows(work / "held.jsonl", rows[-args.held:])
    teacher = models.load("smollm2-135m")
    student, tok, how = models.build_student(StudentConfig(init="from_teacher", num_layers=args.layers), teacher, 0)
    student.save_pretrained(work / "init")
    tok.save_pretrained(work / "init")
    print(f"student: {how}, {models.num_params(student):,} params", flush=True)
    if "seqkd" in arms:
        t0 = time.perf_counter()
        g = Config().generate.model_copy(update={"max_new_tokens": args.new_tokens, "batch_size": 16})
        prompts = read_prompts(str(work / "train.jsonl"))
        generate_file(LocalTeacher(teacher.model, teacher.tokenizer, "smollm2-135m"), prompts,
                      work / "answers.jsonl", g, progress=False)
        print(f"teacher answers to {len(prompts)} training prompts: {time.perf_counter() - t0:.0f} s", flush=True)
    if "cache" in arms:
        t0 = time.perf_counter()
        cfg = load_config(None, base(args, work, work / "unused", 0) +
                          [f"cache.path={work / 'cache'}", "cache.top_k=64"], Config)
        build_cache(cfg, overwrite=True, progress=False)
        print(f"top-64 cache of the training data: {time.perf_counter() - t0:.0f} s", flush=True)
    from stillroom.run.distill import distill   # an untimed 1-step run first: the first run in a process pays
    distill(load_config(None, base(args, work, work / "warm", 0, 1) + ["loss.alpha=0.0", "eval.tasks=[]"], Config),
            overwrite=True, progress=False)   # lazy initialisation that would count against whichever arm is first


def run_arm(name: str, args, work: Path, seed: int, walls: dict) -> dict:
    from stillroom.config import Config
    from stillroom.recipes import load_config
    from stillroom.run.distill import distill

    extra, steps = [], None
    for o in ARMS[name]:
        if o == "SEQKD":
            extra.append(f"data.path={work / 'answers.jsonl'}")
        elif o == "CACHE":
            extra += ["teacher.kind=cache", f"teacher.cache={work / 'cache'}"]
        elif o.startswith("TIME:"):
            ref = o[5:]
            steps = max(1, round(args.steps * walls[(ref, 0)] / walls[("ce", 0)]))
        else:
            extra.append(o)
    out = work / "runs" / f"{name}-{seed}"
    cfg = load_config(None, base(args, work, out, seed, steps) + extra, Config)
    t0 = time.perf_counter()
    m = distill(cfg, overwrite=True, progress=False)
    got = result(m, time.perf_counter() - t0)
    got["row"]["steps"] = steps or args.steps
    records = [json.loads(x) for x in (out / "tasks-rouge.jsonl").read_text().splitlines()]
    if "teacher" in records[0]:   # greedy, so the same in every arm: kept for the arms without a live teacher
        walls.setdefault("teacher answers", [r["teacher"]["answer"] for r in records])
    elif walls.get("teacher answers"):   # a cache arm: its ROUGE-L against the live arms' teacher answers
        from stillroom.eval.tasks import rouge_l
        said = walls["teacher answers"]
        got["row"]["rougeL_vs_teacher"] = statistics.mean(
            rouge_l(r["student after"]["answer"], [t]) if t else 0.0 for r, t in zip(records, said))
    return got


def dml_variants(spec: str, steps: int) -> dict:
    """--dml "name:key=value,key=value;name:..." -> {name: codistill overrides}; `S` in a value is
    --steps (burn_in=S/2)."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, body = part.partition(":")
        over = {}
        for kv in filter(None, body.split(",")):
            k, _, v = kv.partition("=")
            v = v.strip()
            over[k.strip()] = (v == "true" if v in ("true", "false") else
                               int(eval(v, {"S": steps})) if "S" in v else float(v) if "." in v else int(v))
        out[name.strip()] = over
    return out


def run_dml_seed(args, work: Path, seed: int, cuts: dict, variants: dict, kd_shares: list, alone: dict,
                 dml: dict) -> dict:
    """One seed of the DML comparison: both peers alone (CE, and KD at each teacher share a variant
    uses), then each variant co-distilled; rows appended to alone / dml under their keys. -> the
    teacher's numbers (from a run alone)."""
    from stillroom.config import CodistillRunConfig, Config
    from stillroom.recipes import load_config
    from stillroom.run.codistill import codistill
    from stillroom.run.distill import distill

    for share in [0.0] + kd_shares:
        for name, layers in cuts.items():
            key = name if share == 0 else f"{name} kd{share:g}"
            out = work / "runs" / f"alone-{key.replace(' ', '-')}-{seed}"
            over = [o for o in base(args, work, out, seed) if not o.startswith(("student.", "eval.tasks"))]
            # the fair control: the co-distilled loss minus the peer term, i.e. the teacher's term and CE
            # in the recipe's ratio (teacher 0.5 * share : CE 0.5, so alpha = share / (share + 1))
            cfg = load_config(None, over + ["student.init=from_teacher", f"student.layers={layers}",
                                            f"loss.alpha={share / (share + 1)}"], Config)
            t0 = time.perf_counter()
            got = result(distill(cfg, overwrite=True, progress=False), time.perf_counter() - t0)
            r = got["row"]
            alone.setdefault(key, []).append(r)
            print(f"  alone {key} seed {seed}: ppl {r['perplexity']:.2f}, train {r['train_s']:.0f} s", flush=True)
    teacher = got["teacher"]
    for vname, cc in variants.items():
        cfg = CodistillRunConfig.model_validate({
            "teacher": {"model": "smollm2-135m"},
            "peers": [{"name": n, "init": "from_teacher", "layers": layers} for n, layers in cuts.items()],
            "codistill": {"mode": "mutual", **cc},
            "data": {"path": str(work / "train.jsonl"), "eval_path": str(work / "held.jsonl"), "pack": True,
                     "seq_len": args.seq},
            "loss": {"alpha": 0.5},
            "train": {"output_dir": str(work / "runs" / f"dml-{vname}-{seed}"), "max_steps": args.steps,
                      "batch_size": args.batch, "lr": args.lr, "warmup_steps": 4, "log_every": args.steps,
                      "seed": seed},
            "eval": {"gen_prompts": 1, "gen_tokens": 4}})
        t0 = time.perf_counter()
        try:
            m = codistill(cfg, overwrite=True, progress=False)
        except Exception as e:   # reported, not the end of the bench
            print(f"  dml {vname} seed {seed}: FAILED ({type(e).__name__}: {e})", flush=True)
            continue
        wall = time.perf_counter() - t0
        for name in cuts:
            ev = m["eval"][f"{name} after"]
            row = {k: ev.get(k) for k in ("perplexity", "bits_per_byte", "agreement", "kl_per_token")}
            row.update(train_s=m["train"].get("elapsed_s"), wall_s=wall, settings=cc)
            dml.setdefault(f"{vname} {name}", []).append(row)
        print(f"  dml {vname} {cc} seed {seed}: " + ", ".join(
            f"{n} ppl {dml[f'{vname} {n}'][-1]['perplexity']:.2f}" for n in cuts), flush=True)
    return teacher


def run_peers(args, work: Path, walls: dict, ensemble: bool = True) -> dict:
    """DML: two peers (different layer cuts of the teacher) co-distilled (mutual, alpha 0.5), once
    per --dml variant (codistill settings: burn_in, ramp, confidence, teacher_weight), vs the same
    peers trained alone with CE -- and, where a variant gives the teacher a weight, vs the same
    peers trained alone on the same loss minus the peer term (the teacher's term and CE in the
    co-distilled loss's ratio: loss.alpha = tw / (tw + 1) at alpha 0.5), so that the peers' own
    contribution is what is compared; then the ensemble control."""
    from stillroom.config import Config
    from stillroom.recipes import load_config
    from stillroom.models import core as models
    from stillroom.run.distill import distill

    n_t = models.load("smollm2-135m").model.config.num_hidden_layers
    cuts = {"a": models.spread_layers(n_t, args.layers), "b": [i + 1 for i in models.spread_layers(n_t - 1, args.layers)]}
    variants = dml_variants(args.dml, args.steps)
    alone, dml = {}, {}   # {key: [row per seed]}
    kd_shares = sorted({v["teacher_weight"] for v in variants.values() if v.get("teacher_weight")})
    for seed in range(args.dml_seeds):
        teacher = run_dml_seed(args, work, seed, cuts, variants, kd_shares, alone, dml)
    if not ensemble:
        return {"alone": alone, "dml": dml, "ensemble": None, "cuts": cuts, "teacher": teacher}
    # the control: the two peers trained alone (seed 0), as an equal mixture teaching a fresh student
    out = work / "runs" / "ensemble"
    finals = {k: work / "runs" / f"alone-{k}-0" / "final" for k in ("a", "b")}
    cfg = load_config(None, base(args, work, out, 0) + [
        f"teacher.model={finals['a']}", f"teacher.mix=[{{name: b, model: {finals['b']}, weight: 1.0}}]"],
        Config)
    t0 = time.perf_counter()
    ens = result(distill(cfg, overwrite=True, progress=False), time.perf_counter() - t0)
    # that run's "teacher" is peer a: agreement, KL and ROUGE-L vs the teacher are re-measured against
    # SmolLM2, as for every other arm (its perplexity and ROUGE-L vs references need no teacher)
    from stillroom.data.store import load_data
    from stillroom.eval import evaluate
    from stillroom.eval.tasks import rouge_l
    teacher = models.load("smollm2-135m")
    _, held = load_data(cfg, teacher.tokenizer)
    student = models.load(str(out / "final")).model
    cmp = evaluate.score(student, teacher.model, held, teacher.tokenizer.pad_token_id, 8, None)
    ens["row"].update(agreement=cmp["agreement"], kl_per_token=cmp["kl_per_token"])
    records = [json.loads(x) for x in (out / "tasks-rouge.jsonl").read_text().splitlines()]
    said = walls.get("teacher answers")
    ens["row"]["rougeL_vs_teacher"] = statistics.mean(
        rouge_l(r["student after"]["answer"], [t]) if t else 0.0 for r, t in zip(records, said)) if said else None
    return {"alone": alone, "dml": dml, "ensemble": ens, "cuts": cuts, "teacher": teacher}


def fmt(vals: list, pct: bool) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")
    if len(vals) == 1:
        return f(vals[0])
    return f"{f(statistics.mean(vals))} ± {f(statistics.stdev(vals))}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-rows", type=int, default=500)
    ap.add_argument("--held", type=int, default=64)
    ap.add_argument("--task-rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dml-seeds", type=int, default=1, help="seeds of the DML comparison (peers alone and co-distilled)")
    ap.add_argument("--dml", default="recipe:teacher_weight=0.5,confidence=true",
                    help='DML variants, "name:key=value,...;name:..." of codistill settings (burn_in, ramp, '
                         'confidence, teacher_weight); S = --steps, e.g. "plain:;burn:burn_in=S/2;'
                         'conf:confidence=true;teacher:teacher_weight=0.5"; the default is the codistill '
                         'recipe\'s own setting, "plain:" is Zhang et al.\'s DML')
    args = ap.parse_args()
    if not ALPACA.is_file():
        raise SystemExit(f"bench data not found: {ALPACA} (the bench needs ../shared/data)")
    arms = [a for a in ARMS if a in args.arms.split(",")]
    if "ce" not in arms and set(arms) - {"dml"}:   # the reference of every arm but DML (which has its own)
        arms.insert(0, "ce")
    for need, by in (("soft", "ce_time"), ("cache", "ce_time_cache")):
        if by in arms and need not in arms:
            arms.insert(arms.index(by), need)
    logging.basicConfig(level=logging.ERROR)   # each run's notes on the data, repeated per arm: not the result
    from stillroom.cli import _quiet_libraries
    from stillroom.run.feedback import set_progress
    _quiet_libraries()
    set_progress(False)
    t_all = time.perf_counter()
    results, walls, teacher = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(args, work, arms)
        for name in arms:
            if name in ("dml", "ensemble"):
                continue
            for seed in range(args.seeds if name in SEEDED else 1):
                try:
                    got = run_arm(name, args, work, seed, walls)
                except Exception as e:   # one arm's failure is reported, not the end of an hour's bench
                    print(f"  {name} seed {seed}: FAILED ({type(e).__name__}: {e})", flush=True)
                    continue
                teacher = teacher or got["teacher"]
                results.setdefault(name, []).append(got["row"])
                walls[(name, seed)] = got["row"]["train_s"]
                r = got["row"]
                print(f"  {name} seed {seed}: ppl {r['perplexity']:.2f}, bpb {r['bits_per_byte']:.3f}, "
                      f"ROUGE-L {r['rougeL'] or 0:.3f}, train {r['train_s']:.0f} s ({r['steps']} steps)", flush=True)
        peers = run_peers(args, work, walls, "ensemble" in arms) if {"dml", "ensemble"} & set(arms) else None
    print(f"\nAlpaca: {args.train_rows} training rows, {args.held} held-out rows ({args.task_rows} answered, "
          f"{args.new_tokens} new tokens); {args.steps} steps x {args.batch} x {args.seq} packed tokens per arm; "
          f"student: {args.layers} of SmolLM2-135M-Instruct's 30 layers; seeds {args.seeds} for {', '.join(SEEDED)}"
          + (f"; {args.dml_seeds} for DML and its peers alone" if peers else ""))
    head = f"{'arm':<20}" + "".join(f"{label[:24]:>26}" for _, label, _ in METRICS) + f"{'train time / CE':>17}"
    print(head)
    ce_rows = results.get("ce") or (peers["alone"]["a"] if peers else [])   # DML alone: peer a with CE
    ce = {k: statistics.mean(v for r in ce_rows if (v := r[k]) is not None) for k, _, _ in METRICS
          if any(r.get(k) is not None for r in ce_rows)}
    ce_time = statistics.mean(r["train_s"] for r in ce_rows)
    if "ce" not in results:
        print("(no ce arm: the time column is relative to peer a alone with CE; the gap table puts each peer "
              "against itself alone with CE)")
    if teacher is None and peers:
        teacher = peers["teacher"]
    print(f"{'teacher':<20}" + "".join(f"{fmt([teacher[k]], pct):>26}" for k, _, pct in METRICS))
    rows = dict(results)
    if peers:
        rows.update({f"alone {k}": v for k, v in peers["alone"].items()})
        rows.update({k if k.startswith("dml") else f"dml {k}": v for k, v in peers["dml"].items()})
        if peers["ensemble"]:
            rows["ensemble"] = [peers["ensemble"]["row"]]
    for name, rs in rows.items():
        cells = "".join(f"{fmt([r.get(k) for r in rs], pct):>26}" for k, _, pct in METRICS)
        t = statistics.mean(r["train_s"] for r in rs if r.get("train_s")) / ce_time
        print(f"{name:<20}{cells}{t:>16.2f}x")
    if peers and peers["dml"]:
        print("\nDML vs the same peer alone, seed by seed: held-out perplexity DML / alone (< 1: DML better)")
        for key, rs in peers["dml"].items():
            peer = key.rsplit(" ", 1)[1]
            tw = rs[0]["settings"].get("teacher_weight")
            for ref_key in ([f"{peer} kd{tw:g}"] if tw else []) + [peer]:
                ratios = [d["perplexity"] / a["perplexity"] for d, a in zip(rs, peers["alone"][ref_key])]
                print(f"  {key:<28} / alone {ref_key:<10}" + "".join(f"{r:>8.3f}" for r in ratios) +
                      f"   mean {statistics.mean(ratios):.3f}, better in {sum(r < 1 for r in ratios)}/{len(ratios)}")
    print("\nfraction of the teacher gap closed, (arm - CE) / (teacher - CE), on the means"
          + ("" if "ce" in results else " (CE: the same peer alone with CE)") + ":")
    print(f"{'arm':<20}" + "".join(f"{label[:24]:>26}" for _, label, _ in METRICS))
    for name, rs in rows.items():
        if name == "ce":
            continue
        ref = ce
        if "ce" not in results:   # a DML-only run: each peer against itself alone with CE
            peer_rows = peers["alone"][name.split()[-1] if name.startswith("dml") else name.split()[1]]
            ref = {k: statistics.mean(r[k] for r in peer_rows) for k in ce}
        cells = []
        for k, _, _ in METRICS:
            vals = [r.get(k) for r in rs if r.get(k) is not None]
            if not vals or k not in ref or teacher.get(k) is None or teacher[k] == ref[k]:
                cells.append(f"{'-':>26}")
                continue
            cells.append(f"{(statistics.mean(vals) - ref[k]) / (teacher[k] - ref[k]):>26.2f}")
        print(f"{name:<20}" + "".join(cells))
    print(f"\n(whole bench: {(time.perf_counter() - t_all) / 60:.0f} min)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "teacher": teacher,
                                         "rows": rows, "peers_cuts": peers and peers["cuts"]}, indent=2, default=str))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import results
    results.main(main, "quality", "Methods on one fair protocol (bench/quality.py)")
