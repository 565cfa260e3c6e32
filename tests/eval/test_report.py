"""The run report: a self-contained HTML page written at the end of every distill run, loaded in a
real headless browser (Debian's chromium) that must find every plot rendered. The screenshot is kept
as an artifact in artifacts/report.png."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from stillroom.recipes import load_config
from stillroom.run.distill import distill

from conftest import run_cli, tiny_overrides

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture(scope="module")
def run(tmp_path_factory, teacher_dir, chat_file):
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = load_config(None, tiny_overrides(teacher_dir, chat_file, out) + [
        "train.max_steps=6", "train.eval_every=2", "loss.terms={ce: 0.2, forward_kl: 0.8, hidden_cosine: 0.1}"])
    distill(cfg, progress=False)
    return out


def test_every_run_writes_a_self_contained_report(run):
    page = (run / "report.html").read_text()
    assert page.count("<figure") == 3 and page.count("<svg") >= 3
    assert "<script src" not in page and "<link" not in page and "<img" not in page   # nothing to fetch
    assert "hidden_cosine (raw)" in page                     # a curve per logged loss term
    assert "top-1 agreement w/ teacher" in page and "forward_kl: 0.8" in page   # the table and the config


def test_a_codistill_run_writes_its_report_too(tmp_path, teacher_dir, chat_file):
    """Co-distillation ends like distill: report.html with a loss curve per peer and the table."""
    from stillroom.config import CodistillRunConfig
    from stillroom.run.codistill import codistill
    out = tmp_path / "co"
    over = [o for o in tiny_overrides(teacher_dir, chat_file, out) if not o.startswith("student.")]
    cfg = load_config("codistill", over + ["peers.0.num_layers=2", "peers.1.layers=[1,3]", "train.eval_every=2",
                                           "train.max_steps=4"], CodistillRunConfig)
    result = codistill(cfg, progress=False)
    page = (out / "report.html").read_text()
    assert result["report"] == str(out / "report.html")
    assert "peer a" in page and "peer b" in page and page.count("<svg") >= 2
    assert "<script src" not in page and "<img" not in page


def test_report_command_adds_a_compare_table(run):
    cols = {"teacher": {"params": 10, "size_mb": 1.0, "perplexity": 3.0, "decode_tokens_per_s": 5.0},
            "student": {"params": 5, "size_mb": 0.5, "perplexity": 4.0, "decode_tokens_per_s": 9.0}}
    (run / "compare.json").write_text(json.dumps({"columns": cols}))
    r = run_cli("report", run)
    assert r.returncode == 0, r.stderr[-2000:]
    page = (run / "report.html").read_text()
    assert "stillroom compare" in page and "student (compare)" in page
    (run / "compare.json").unlink()
    r = run_cli("report", run / "nope")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium(), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_plots_render_in_headless_chromium(run):
    import matplotlib.image as mpimg

    url = (run / "report.html").as_uri()
    flags = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars"]
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", url], capture_output=True,
                         text=True, timeout=120).stdout
    assert 'data-plots="3/3"' in dom, dom[-500:]       # the page's own check: every plot has a box and marks
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run(flags + ["--window-size=1200,1400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    img = mpimg.imread(shot)
    top = img[100:900, :, :3]                          # where the plots are
    drawn = (top.min(-1) < 0.9).mean()
    colored = ((top.max(-1) - top.min(-1)) > 0.3).mean()   # the curves' colours, not just black text
    assert drawn > 0.02 and colored > 0.002, (drawn, colored)
