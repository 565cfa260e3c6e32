"""A bench's own section of docs/results.md, written by the bench itself (`--write`).

    from results import recorded
    with recorded("laptop", args.write, title="The laptop hour"):
        ...   # everything printed inside goes into the section, as printed

or, for a bench whose main() parses its own flags, `results.main(main, "kd_step", "A KD step")` in
place of `main()`: it takes `--write` off the command line first.

The section sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in docs/results.md; running
the bench again with `--write` replaces it (a new one is added before "## The benches"). Its header
says the date, the commit (with "+ local changes" when the tree is dirty), the machine (CPU model,
cores, whether it has AVX512-BF16 and AMX, torch, GPU if any) and the command, so a number is never
quoted without them. What the bench prints is kept as it printed it, in a fenced block; prose around
it is written by hand outside the markers.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"


def machine() -> str:
    """One line: CPU model, cores, AVX512-BF16 / AMX, memory, torch, GPU."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    parts = [model, f"{os.cpu_count()} cores",
             "AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16",
             "AMX" if "amx_bf16" in flags else "no AMX"]
    with contextlib.suppress(OSError, ValueError):
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        parts.append(f"{kb / 2**20:.0f} GB")
    try:
        import torch
        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    return ", ".join(parts)


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + (" + local changes" if git("status", "--porcelain", "--untracked-files=no") else "")


ARGV = list(sys.argv)   # the command as given (main() below takes --write off sys.argv)


def update(name: str, title: str, body: str, path: Path = RESULTS, rev: str | None = None) -> None:
    """Put `body` under a header in the section `name` of `path`, replacing the one there. rev: the
    commit the bench ran (default: the checkout's now)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(ARGV[0], ROOT), *ARGV[1:]])
    section = (f"{start}\n## {title}\n\n{datetime.date.today().isoformat()}, commit {commit()}, `{command}`.\n"
               f"Machine: {machine()}.\n\n<!-- not run: a bench's output -->\n```\n{body.rstrip()}\n```\n{end}")
    text = path.read_text()
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    elif "## The benches" in text:
        text = text.replace("## The benches", section + "\n\n## The benches", 1)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote the section '{title}' of {os.path.relpath(path)}", file=sys.stderr)


class _Tee(io.TextIOBase):
    def __init__(self, out):
        self.out, self.kept = out, io.StringIO()

    def write(self, s):
        self.kept.write(s)
        return self.out.write(s)

    def flush(self):
        self.out.flush()


@contextlib.contextmanager
def recorded(name: str, write: bool, title: str):
    """Print as usual; with `write`, also keep what was printed and, if the bench finishes, write it
    as its section of docs/results.md (a bench that fails writes nothing)."""
    if not write:
        yield
        return
    rev, tee = commit(), _Tee(sys.stdout)   # the commit it starts on: the checkout may move while it runs
    with contextlib.redirect_stdout(tee):
        yield
    update(name, title, tee.kept.getvalue(), rev=rev)


def main(bench_main, name: str, title: str):
    """Run a bench's own main(); with --write on the command line (taken off before main parses
    its flags), what it printed becomes its section of docs/results.md."""
    write = "--write" in sys.argv[1:]
    if write:
        sys.argv.remove("--write")
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        print("(bench/results.py: add --write to put what this bench prints into docs/results.md)")
    with recorded(name, write, title):
        bench_main()
