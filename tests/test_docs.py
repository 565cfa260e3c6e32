"""The docs: the site builds with `mkdocs build --strict`, opens in headless Chromium with its
navigation and search, has no broken internal link, and its references list every config key and
CLI flag (generated from the code: a key without help text fails here); the README stays a front
page. Screenshots of the home page and a guide go to artifacts/."""
import argparse
import html.parser
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                           "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])


def _parse(page: Path) -> _Links:
    p = _Links()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def test_no_internal_link_is_broken(site):
    pages = {p: _parse(p) for p in site.rglob("*.html")}
    broken = []
    for page, links in pages.items():
        for href in links.hrefs:
            if re.match(r"^[a-z]+:", href) or href.startswith("//"):
                continue   # another site, mailto:
            path, _, anchor = href.partition("#")
            base = site if path.startswith("/") else page.parent   # the 404 page links from the site's root
            target = (base / path.lstrip("/")).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)} -> {href}")
            elif anchor and target.suffix == ".html" and anchor not in pages.get(target, _parse(target)).ids:
                broken.append(f"{page.relative_to(site)} -> {href} (no such anchor)")
    assert len(pages) > 15 and not broken, broken[:20]


def _walk(model, prefix=""):
    """Every leaf key of a config type (written here, not taken from stillroom.reference)."""
    for name, field in model.model_fields.items():
        inner = [a for a in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            many = typing.get_origin(field.annotation) is list
            yield from _walk(inner[0], f"{prefix}{name}.{'N.' if many else ''}")
        else:
            yield f"{prefix}{name}", field


def test_every_config_key_has_help_and_is_in_the_reference(site):
    from stillroom.config import CodistillRunConfig, Config

    page = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    keys = {k: f for root in (Config, CodistillRunConfig) for k, f in _walk(root)}
    assert len(keys) > 100
    assert not [k for k, f in keys.items() if not (f.description or "").strip()], "keys without help text"
    assert not [k for k in keys if f"<code>{k}</code>" not in page], "keys missing from the reference"


def test_every_cli_flag_has_help_and_is_in_the_reference(site):
    from stillroom.cli import parser

    page = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing, silent = [], []
    for verb, p in sub.choices.items():
        if f"stillroom {verb}</code>" not in page:
            missing.append(verb)
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if not a.help:
                silent.append(f"{verb} {a.option_strings or a.dest}")
            for flag in a.option_strings:
                if flag not in page:
                    missing.append(f"{verb} {flag}")
    assert len(sub.choices) >= 9 and not missing and not silent, (missing, silent)


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium(), reason="Debian's chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("page,shot", [("index.html", "docs-home.png"), ("methods/index.html", "docs-guide.png")])
def test_the_site_opens_in_headless_chromium(site, page, shot):
    url = (site / page).as_uri()
    flags = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars"]
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", url], capture_output=True,
                         text=True, timeout=120).stdout
    assert 'class="md-nav' in dom and "md-search__input" in dom, dom[-800:]   # navigation and search
    assert "Getting started" in dom and "Config keys" in dom                # the nav's entries, rendered
    ARTIFACTS.mkdir(exist_ok=True)
    subprocess.run(flags + ["--window-size=1280,900", f"--screenshot={ARTIFACTS / shot}", url],
                   capture_output=True, timeout=120)
    assert (ARTIFACTS / shot).stat().st_size > 10_000


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) < 20_000 and len(text.splitlines()) <= 250
    first = next(i for i, line in enumerate(text.splitlines()) if "data.path=" in line and "stillroom" in line)
    assert first < 60, "a newcomer's first own-data command should be on the first screen"
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / target).is_file(), target


# ---------------------------------------------------------------------------------- the examples

FENCE = re.compile(r"(?:^[ \t]*<!-- (runs|not run): *(.*?) -->\n)?^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("**/*.md"))]


def blocks(path: str):
    """(kind, why, language, code) of each fenced block: kind "runs" (why: the test that runs it)
    or "not run" (why: the reason), None when unmarked."""
    return [m.groups() for m in FENCE.finditer((ROOT / path).read_text(encoding="utf-8"))]


def test_every_block_is_run_or_says_why_not():
    unmarked, dangling = [], []
    for path in DOCS:
        for kind, why, _, code in blocks(path):
            if kind is None or not why.strip():
                unmarked.append(f"{path}: {code.splitlines()[0][:60] if code else ''}")
            elif kind == "runs" and not (ROOT / why.strip()).is_file():
                dangling.append(f"{path}: {why}")
    assert not unmarked and not dangling, (unmarked, dangling)


TEACHERS = ("smollm2-135m", "path/to/teacher", "org/model-on-the-hub")
CONFIG_VERBS = ("distill", "codistill", "cache", "prepare")


def commands(code: str) -> list[str]:
    """The shell commands of a block: continuations joined, comments and blank lines dropped."""
    out, acc = [], ""
    for line in code.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        acc += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            if acc.strip():
                out.append(acc.strip())
            acc = ""
    return out


def tiny(cmd: str, teacher: Path) -> list[str]:
    """A documented command on the tiny teacher: the teacher swapped in, and a seconds-long run."""
    import shlex

    args = [str(teacher) if a in TEACHERS else a.replace("=" + a.split("=", 1)[-1], "=" + str(teacher))
            if "=" in a and a.split("=", 1)[1] in TEACHERS else a for a in shlex.split(cmd)]
    assert args[0] == "stillroom", f"a block marked to run holds another command: {cmd}"
    verb, rest = args[1], args[2:]
    given = " ".join(rest)
    if verb in CONFIG_VERBS:
        more = [f"teacher.model={teacher}"] if "teacher.model=" not in given else []
        more += [] if "data.path=" in given else ["data.path=my.jsonl"]
        more += ["student.num_layers=2"] if verb == "distill" else []
        more += ["peers.0.num_layers=2", "peers.1.layers=[0,3]"] if verb == "codistill" else []
        more += ["data.seq_len=64", "train.max_steps=2", "train.batch_size=2", "eval.gen_prompts=1",
                 "eval.gen_tokens=2", "train.save_every=1", "--no-progress"]
        opts = [a for a in rest if a.startswith("--")]
        rest = [a for a in rest if not a.startswith("--")] + more + opts
    elif verb == "eval":
        rest += ["--max-batches", "1", "--gen-prompts", "1", "--gen-tokens", "2", "--no-progress"]
    elif verb == "generate":
        rest += (["--teacher", str(teacher)] if "--teacher" not in rest else []) + ["--max-new-tokens", "4",
                                                                                   "--no-progress"]
    elif verb == "compare":
        rest += ["--rounds", "1", "--max-examples", "2", "--new-tokens", "2", "--prefill-tokens", "8", "--no-progress"]
        if "--formats" in rest and not __import__("importlib").util.find_spec("llama_cpp"):
            i = rest.index("--formats")   # the GGUF rows need llama-cpp-python (make test-api builds it)
            j = i + 1
            while j < len(rest) and not rest[j].startswith("--"):
                j += 1
            rest = rest[:i] + rest[j:]
    return ["stillroom", verb, *rest]


RUN_HERE = [path for path in DOCS if any(b[0] == "runs" and b[1].strip() == "tests/test_docs.py"
                                         for b in blocks(path))]


@pytest.mark.parametrize("path", RUN_HERE)
def test_the_documented_commands_run(path, tmp_path, teacher_dir, chat_file, monkeypatch):
    """The page's blocks marked to run here, command by command in the page's order (a later
    block uses what an earlier one made), in a fresh folder holding the files the docs name
    (my.jsonl, held_out.jsonl, prompts.jsonl, my.yaml), on the tiny teacher: every one exits 0."""
    import json

    from conftest import run_cli

    (tmp_path / "my.jsonl").write_bytes(chat_file.read_bytes())
    (tmp_path / "held_out.jsonl").write_bytes(chat_file.read_bytes())
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Name a colour, {i}."}) + "\n"
                                                    for i in range(3)))
    (tmp_path / "my.yaml").write_text("train:\n  output_dir: runs/from-yaml\n")
    monkeypatch.chdir(tmp_path)
    ran = 0
    for kind, why, _, code in blocks(path):
        if kind != "runs" or why.strip() != "tests/test_docs.py":
            continue
        for cmd in commands(code):
            argv = tiny(cmd, teacher_dir)
            r = run_cli(*argv[1:], timeout=600)
            assert r.returncode == 0, f"{cmd}\n-> {' '.join(argv)}\n{r.stderr[-3000:]}"
            ran += 1
    assert ran


def test_every_test_file_named_by_path_exists():
    """The docs, the Makefile, CI and the device check name test files by path (`make test-api`
    selects three, the device check a dozen): each must exist, so a moved test module is never
    dropped from them in silence (tests/ mirrors stillroom/: tests/<package>/test_*.py)."""
    sources = [ROOT / "README.md", ROOT / "Makefile", ROOT / ".ci" / "run", *sorted((ROOT / "docs").rglob("*.md")),
               *sorted((ROOT / "bench").glob("*")), *sorted((ROOT / "stillroom").rglob("*.py")),
               *sorted((ROOT / "tests").rglob("*.py"))]
    named = {(src.relative_to(ROOT), m) for src in sources if src.is_file()
             for m in re.findall(r"\btests/[\w/]+\.py", src.read_text(errors="replace"))}
    assert len(named) > 20
    missing = sorted(f"{src}: {m}" for src, m in named if not (ROOT / m).is_file())
    assert not missing, missing
    test_modules = sorted(p.relative_to(ROOT / "tests").parts[0] for p in (ROOT / "tests").rglob("test_*.py")
                          if p.parent != ROOT / "tests")
    assert set(test_modules) <= {p.name for p in (ROOT / "stillroom").iterdir() if p.is_dir()}, set(test_modules)


def test_the_module_map_names_every_module():
    """docs/design.md's module map names every module of stillroom/, each under its package's entry,
    and no module that is gone (a new or moved module must be placed on the map)."""
    text = (ROOT / "docs" / "design.md").read_text()
    tree = text[text.index("stillroom/\n"):text.index("\ntests/ ")]
    # the map's top-level entries: "  name.py" or "  package/", each owning the lines up to the next one
    parts = re.split(r"\n  (?=\S)", tree)
    sections = {p.split()[0]: p for p in parts[1:]}
    modules = sorted(p.relative_to(ROOT / "stillroom") for p in (ROOT / "stillroom").rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    assert len(modules) > 40
    missing = [str(m) for m in modules
               if not re.search(rf"\b{re.escape(m.name)}\b", sections.get(f"{m.parts[0]}/" if len(m.parts) > 1
                                                                           else m.name, ""))]
    assert not missing, f"modules not on docs/design.md's map: {missing}"
    named = {(key, n) for key, body in sections.items() if key.endswith("/")
             for n in re.findall(r"\b(\w+\.py)\b", body)}
    gone = sorted(f"{key}{n}" for key, n in named if not (ROOT / "stillroom" / key / n).is_file())
    assert not gone, f"docs/design.md names modules that are not there: {gone}"
