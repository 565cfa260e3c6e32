"""`stillroom report RUN_DIR`: one self-contained HTML page per run (written at the end of every
distill run as <RUN_DIR>/report.html).

Plots (inline SVG from matplotlib, no external file or script): the training loss, and each loss
term's raw size per token when the run logged them; the held-out metrics over steps (perplexity,
agreement and KL to the teacher, from the intermediate and final evaluations); quality against size
and speed for the run's models, and for the models of `stillroom compare --out RUN_DIR/compare.json`
when that file exists. Then the comparison table(s) and the resolved config.
"""
from __future__ import annotations

import html
import io
import json
import logging
from pathlib import Path

from stillroom.errors import UserError


def _svg(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _read(path: Path, shape, strict: bool):
    """A JSON file the report shows (None when absent). One that does not parse or lacks the shape
    stillroom writes is refused in one line (`stillroom report`), or left out with a warning (the
    report written at the end of a run, which a damaged side file must not fail)."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if shape(obj):
            return obj
        why = "not the shape stillroom writes"
    except (OSError, ValueError, RecursionError) as e:
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
    what = "rerun `stillroom compare ... --out` to write it again, or remove it" if path.name == "compare.json" \
        else "remove it, or rerun the command that wrote it"
    if strict:
        raise UserError(f"report: {path} is damaged ({why}): {what}")
    logging.getLogger("stillroom").warning("report: %s is damaged (%s), left out: %s", path, why, what)
    return None


def _columns(key):
    return lambda d: isinstance(d, dict) and isinstance(d.get(key), dict) and \
        all(isinstance(c, dict) for c in d[key].values())


def read_run(run: Path, strict: bool = True) -> dict:
    log = run / "metrics.jsonl"
    if not log.is_file():
        raise UserError(f"{run}: no metrics.jsonl here (not a stillroom run folder?)")
    steps, evals = [], []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):
            continue   # a line torn by a crash
        if isinstance(r, dict) and isinstance(r.get("eval", {}), dict):
            (evals if "eval" in r else steps).append(r.get("eval", r))
    metrics = _read(run / "final" / "metrics.json", _columns("eval"), strict)
    compare = _read(run / "compare.json", _columns("columns"), strict)
    config = (run / "config.yaml").read_text(encoding="utf-8", errors="replace") \
        if (run / "config.yaml").is_file() else ""
    return {"steps": steps, "evals": evals, "metrics": metrics, "compare": compare, "config": config}


def plots(d: dict) -> list[tuple[str, str]]:
    out = []
    steps = [r for r in d["steps"] if "loss" in r]
    if steps:
        fig, ax = _figure("training loss")
        peers = sorted({k for r in steps if isinstance(r["loss"], dict) for k in r["loss"]})
        if peers:   # co-distillation: one curve per peer
            for n in peers:
                ax.plot(*zip(*[(r["step"], r["loss"][n]) for r in steps if n in r["loss"]]), marker=".",
                        label=f"peer {n}")
        else:
            ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], marker=".", label="total (weighted)")
        names = sorted({k for r in steps for k in r.get("terms", {})})
        for n in names:
            pts = [(r["step"], r["terms"][n]) for r in steps if n in r.get("terms", {})]
            ax.plot(*zip(*pts), marker=".", label=f"{n} (raw)")
        ax.set_xlabel("step")
        ax.set_ylabel("per target token")
        ax.legend(fontsize=8)
        out.append(("loss", _svg(fig)))
    ev = list(d["evals"])
    m = d["metrics"]
    if m:   # before (step 0) and after (last step) from the final evaluation
        cols = m["eval"]
        last = (m.get("train") or {}).get("step")
        for key, step in (("student before", 0), ("student after", last)):
            c = cols.get(key)
            if c and step is not None:
                ev.append({"step": step, "student_perplexity": c["perplexity"], "agreement": c["agreement"],
                           "kl_per_token": c["kl_per_token"]})
    ev = sorted((e for e in ev if e.get("step") is not None), key=lambda e: e["step"])
    if ev:
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, (key, label) in zip(axes, (("student_perplexity", "held-out perplexity"),
                                           ("agreement", "top-1 agreement w/ teacher"),
                                           ("kl_per_token", "KL(teacher||student)/token"))):
            scale = 100 if key == "agreement" else 1   # the table shows agreement in %
            pts = [(e["step"], e[key] * scale) for e in ev if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o")
            if key == "student_perplexity":
                ax.set_yscale("log")
            ax.set_title(label + (" (%)" if scale == 100 else ""), fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        out.append(("eval", _svg(fig)))
    models = _models(d)
    pts = [(n, c) for n, c in models.items() if c.get("perplexity") and c.get("params")]
    if pts:
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        for ax, (key, label) in zip(axes, (("size_mb", "size MB"), ("speed", "generation tokens/s"))):
            xs = [c.get(key) for _, c in pts if c.get(key)]
            mid = (min(xs) + max(xs)) / 2 if xs else 0
            for n, c in pts:
                x = c.get(key)
                if x:
                    ax.scatter([x], [c["perplexity"]])
                    right = x > mid   # a label runs towards the middle, so it stays inside the axes
                    ax.annotate(n, (x, c["perplexity"]), fontsize=8, xytext=(-4 if right else 4, 4),
                                textcoords="offset points", ha="right" if right else "left")
            ax.margins(x=0.15, y=0.2)
            ax.set_xlabel(label)
            ax.set_ylabel("held-out perplexity")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.set_title(f"quality vs {label.split()[0]}", fontsize=10)
        out.append(("tradeoff", _svg(fig)))
    return out


def _models(d: dict) -> dict:
    """name -> {perplexity, params, size_mb, speed} from the run's table and compare.json."""
    out = {}
    if d["metrics"]:
        for n, c in d["metrics"]["eval"].items():
            out[n] = {"perplexity": c.get("perplexity"), "params": c.get("params"), "size_mb": c.get("size_mb"),
                      "speed": c.get("gen_tokens_per_s")}
    if d["compare"]:
        for n, c in d["compare"]["columns"].items():
            out[f"{n} (compare)"] = {"perplexity": c.get("perplexity"), "params": c.get("params"),
                                     "size_mb": c.get("size_mb"), "speed": c.get("decode_tokens_per_s")}
    return out


def _table(cols: dict, rows) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in cols)
    body = []
    for key, label, fmt in rows:
        cells = "".join(f"<td>{'-' if c.get(key) is None else html.escape(fmt(c[key]))}</td>" for c in cols.values())
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def _task(run: Path, task: str, got: dict, samples: int = 5) -> str:
    """A generation task's scores per model, and its first rows' answers side by side."""
    from stillroom.eval.tasks import LABELS

    scores = got["scores"]
    rows = [(k, label, lambda v: f"{v:.4f}") for k, label in LABELS.items() if any(k in c for c in scores.values())]
    part = f"<h2>Task {html.escape(task)} ({got['rows']} rows, greedy answers)</h2>" + _table(scores, rows)
    path = run / got["answers"]
    try:
        records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()[:samples]]
    except (OSError, ValueError):
        return part + f"<p>(its answers, {html.escape(str(path))}, could not be read)</p>"
    names = list(scores)
    cell = lambda t: f"<td class='text'>{html.escape(t)}</td>"  # noqa: E731
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["prompt", "reference", *names])
    body = "".join("<tr>" + cell(r["prompt"]) + cell(r["references"][0]) +
                   "".join(cell(r.get(n, {}).get("answer", "")) for n in names) + "</tr>" for r in records)
    return (part + f"<h3>Sample answers (the first {len(records)} of {html.escape(got['answers'])})</h3>"
            f"<table><tr>{head}</tr>{body}</table>")


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
pre{background:#f6f6f6;padding:1em;overflow:auto}td.text{text-align:left;vertical-align:top;max-width:18em;white-space:pre-wrap}figure{margin:1em 0}"""

# After load: every plot must have a non-empty box and drawn marks; the result lands in the DOM
# (data-plots) so a headless browser's --dump-dom shows what it rendered.
CHECK = """<script>window.addEventListener('load',()=>{const f=[...document.querySelectorAll('figure svg')];
const ok=f.filter(s=>{const b=s.getBoundingClientRect();return b.width>50&&b.height>50&&
s.querySelectorAll('path,use').length>5});document.body.dataset.plots=ok.length+'/'+f.length;});</script>"""


def build(run: Path, strict: bool = True) -> str:
    from stillroom.eval.evaluate import ROWS as EVAL_ROWS
    d = read_run(run, strict)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>stillroom: {html.escape(run.name)}</title>"
             f"<style>{CSS}</style></head><body><h1>stillroom run: {html.escape(str(run))}</h1>"]
    if d["metrics"]:
        t = d["metrics"].get("train") or {}
        parts.append(f"<p>{t.get('step', '?')} steps, {t.get('elapsed_s', '?')} s of training, "
                     f"{d['metrics'].get('held_out_tokens', '?'):,} held-out target tokens.</p>")
    for name, svg in plots(d):
        parts.append(f"<figure id='plot-{name}'>{svg}</figure>")
    if d["metrics"]:
        parts.append("<h2>Teacher and student</h2>" + _table(d["metrics"]["eval"], EVAL_ROWS))
    for task, got in ((d["metrics"] or {}).get("tasks") or {}).items():
        parts.append(_task(run, task, got))
    if d["compare"]:
        from stillroom.deploy.compare import ROWS as CMP_ROWS
        parts.append("<h2>stillroom compare</h2>" + _table(d["compare"]["columns"], CMP_ROWS))
    parts.append(f"<h2>Resolved config</h2><pre>{html.escape(d['config'])}</pre>{CHECK}</body></html>")
    return "".join(parts)


def write(run: Path, strict: bool = True) -> Path | None:
    """<run>/report.html, written atomically. strict=False (the end of a run): a damaged side file
    is left out with a warning rather than refused (see _read)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    try:
        page = build(run, strict)
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        why = f"{run}'s files hold values of another shape than stillroom writes ({type(e).__name__}: {e})"
        if strict:
            raise UserError(f"report: {why[:300]}") from None
        logging.getLogger("stillroom").warning("report: not written: %s", why[:300])
        return None
    out, tmp = run / "report.html", run / "report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
