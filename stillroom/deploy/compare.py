"""`stillroom compare TEACHER STUDENT [STUDENT...]`: what a student gained and lost, in one table.

For the teacher and each student, and each student's GGUF exports (`--formats q8_0 q4_0`, run by
llama.cpp), on the same held-out data and the same prompts:

  params, size on disk, peak memory (the max RSS of a fresh process that loads the model and runs
  the timings, less what the process held after importing its runtime: torch or llama.cpp), prefill tokens/s (one --prefill-tokens prompt), decode tokens/s (greedy, --new-tokens
  after a short prompt), latency of the fixed prompt (prefill + all new tokens), held-out perplexity,
  top-1 agreement and KL(teacher || model) per token -- every quality number from the model's own
  logits (llama.cpp's for GGUF files) against the teacher's -- plus side-by-side greedy generations.

Speed and memory are measured in a separate process per model, one after another, so one model's
memory never counts against another's. The machine is noisy: read the columns side by side.
Transformers models run on the GPU when there is one (timed after a synchronize; the peak of the
device memory too), in fp32 everywhere; GGUF files on the CPU, as llama.cpp's CPU build runs them.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stillroom.errors import UserError
from stillroom.models.running import best_device

log = logging.getLogger("stillroom")

DEFAULT_PROMPTS = ["Once upon a time, there was a little dog named", "The best way to learn a new language is",
                   "Explain why the sky looks blue during the day."]


# ------------------------------------------------------------------------------------ one model, own process

def _rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: the latter carries the
    parent's peak across fork + exec, which hid the model under the comparing process's own size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_hf(path, prompt, gen_prompt, new_tokens, rounds):
    from transformers import AutoModelForCausalLM

    from stillroom.eval.evaluate import synchronize

    dev = best_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(dev)
    x, g = torch.tensor([prompt], device=dev), torch.tensor([gen_prompt], device=dev)

    def timed(run):   # the device's work done before the clock is read, not only queued
        synchronize(dev)
        t = time.perf_counter()
        run()
        synchronize(dev)
        return time.perf_counter() - t

    with torch.inference_mode():
        model(input_ids=x)  # warm-up
        pre = [timed(lambda: model(input_ids=x)) for _ in range(rounds)]
        short = [timed(lambda: model(input_ids=g)) for _ in range(rounds)]
        runs = [timed(lambda: model.generate(input_ids=g, attention_mask=torch.ones_like(g), max_new_tokens=new_tokens,
                                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0))
                for _ in range(rounds)]
    return pre, short, runs


def _measure_gguf(path, prompt, gen_prompt, new_tokens, rounds):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(path), n_ctx=max(len(prompt), len(gen_prompt) + new_tokens) + 8, verbose=False,
                          n_threads=torch.get_num_threads())

    def prefill(ids):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - t

    def generate():
        llm.reset()
        t = time.perf_counter()
        llm.eval(gen_prompt)
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - t

    prefill(prompt)   # warm-up
    pre = [prefill(prompt) for _ in range(rounds)]
    short = [prefill(gen_prompt) for _ in range(rounds)]
    runs = [generate() for _ in range(rounds)]
    return pre, short, runs


def worker(spec: dict) -> dict:
    """Runs in its own process: load one model, time it, report its peak memory."""
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "gguf":
        import llama_cpp  # noqa: F401
    else:
        import transformers  # noqa: F401
    before = _rss_bytes()   # the interpreter, torch and the runtime: not the model's
    fn = _measure_gguf if spec["kind"] == "gguf" else _measure_hf
    pre, short, runs = fn(spec["path"], spec["prompt"], spec["gen_prompt"], spec["new_tokens"], spec["rounds"])
    n, m = len(spec["prompt"]), spec["new_tokens"]
    med = statistics.median
    on_gpu = spec["kind"] != "gguf" and best_device().type == "cuda"
    return {"prefill_tokens_per_s": n / med(pre),
            "decode_tokens_per_s": m / max(med(runs) - med(short), 1e-9),
            "latency_s": med(runs), "peak_mb": (_rss_bytes() - before) / 2**20,
            "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None}


def measure(kind: str, path, prompt, gen_prompt, new_tokens: int, rounds: int, threads: int) -> dict:
    spec = {"kind": kind, "path": str(path), "prompt": prompt, "gen_prompt": gen_prompt,
            "new_tokens": new_tokens, "rounds": rounds, "threads": threads}
    code = "import json, sys; from stillroom.deploy.compare import worker; print(json.dumps(worker(json.loads(sys.argv[1]))))"
    r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"could not time {path}: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ quality

@torch.no_grad()
def gguf_logits(path, examples) -> list[torch.Tensor]:
    """llama.cpp's logits over each example's tokens (what the deployed file computes)."""
    import llama_cpp
    import numpy as np

    n = max(len(e.input_ids) for e in examples)
    llm = llama_cpp.Llama(str(path), n_ctx=n + 8, logits_all=True, verbose=False, n_threads=torch.get_num_threads())
    out = []
    for e in examples:
        llm.reset()
        llm.eval(e.input_ids)
        out.append(torch.tensor(np.array(llm.scores[:len(e.input_ids)]), dtype=torch.float32))
    return out


@torch.no_grad()
def quality(teacher, examples, logits_of, tokenizer) -> dict:
    """Perplexity, bits per byte, agreement and KL to the teacher, example by example (batch 1: no
    padding, the same for every model kind). logits_of(i, example) -> (S, V) logits of the compared
    model (moved to the teacher's device here)."""
    from stillroom.eval.evaluate import byte_counter, token_stats
    from stillroom.losses import IGNORE_INDEX

    count = byte_counter(tokenizer)
    tot = dict(student_nll=0.0, teacher_nll=0.0, kl=0.0, agree=0, tokens=0)
    n_bytes = 0
    for i, e in enumerate(examples):
        dev = next(teacher.parameters()).device
        ids = torch.tensor([e.input_ids], device=dev)
        labels = torch.tensor([e.labels[1:] + [IGNORE_INDEX]], device=dev)
        t = teacher(input_ids=ids).logits
        s = logits_of(i, e).to(dev).reshape(1, len(e.input_ids), -1)
        w = min(t.shape[-1], s.shape[-1])
        for k, v in token_stats(s[..., :w], t[..., :w], labels).items():
            tot[k] += v
        n_bytes += count(labels)
    n = max(tot["tokens"], 1)
    bpb = lambda nll: nll / math.log(2) / n_bytes if n_bytes else None  # noqa: E731
    return {"perplexity": math.exp(tot["student_nll"] / n), "teacher_perplexity": math.exp(tot["teacher_nll"] / n),
            "bits_per_byte": bpb(tot["student_nll"]), "teacher_bits_per_byte": bpb(tot["teacher_nll"]),
            "agreement": tot["agree"] / n, "kl_per_token": tot["kl"] / n, "tokens": tot["tokens"]}


def generations(kind, path, tok, prompts, new_tokens) -> list[str]:
    if kind == "gguf":
        import llama_cpp
        llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, n_threads=torch.get_num_threads())
        return [llm.create_completion(p, max_tokens=new_tokens, temperature=0.0)["choices"][0]["text"].strip()
                for p in prompts]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(best_device())
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        with torch.no_grad():
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


# ------------------------------------------------------------------------------------ the table

ROWS = [("params", "parameters", "{:,}".format), ("size_mb", "size on disk MB", "{:.2f}".format),
        ("peak_mb", "peak memory MB (RSS over runtime)", "{:.0f}".format),
        ("device_peak_mb", "peak GPU memory MB", "{:.0f}".format),
        ("prefill_tokens_per_s", "prefill tokens/s", "{:.0f}".format),
        ("decode_tokens_per_s", "decode tokens/s", "{:.1f}".format),
        ("latency_s", "latency s (fixed prompt)", "{:.2f}".format),
        ("perplexity", "perplexity (held-out)", "{:.3f}".format),
        ("bits_per_byte", "bits per byte (held-out)", "{:.4f}".format),
        ("agreement", "top-1 agreement w/ teacher", "{:.1%}".format),
        ("kl_per_token", "KL(teacher||model)/token", "{:.4f}".format),
        ("draft_accepted_per_step", "as draft: accepted/teacher step", "{:.2f}".format),
        ("draft_acceptance", "as draft: acceptance rate", "{:.1%}".format),
        ("draft_speedup", "as draft: teacher speed-up", "{:.2f}x".format),
        ("draft_identical", "as draft: output identical", str)]
DRAFT_KEYS = {"draft_accepted_per_step", "draft_acceptance", "draft_speedup", "draft_identical"}


def table(cols: dict[str, dict]) -> str:
    names = list(cols)
    rows = [r for r in ROWS if r[0] not in {*DRAFT_KEYS, "device_peak_mb"}
            or any(c.get(r[0]) is not None for c in cols.values())]
    lw = max(len(r[1]) for r in rows)
    cw = [max(11, len(n)) for n in names]
    lines = [" " * lw + "  " + "  ".join(n.rjust(w) for n, w in zip(names, cw))]
    for key, label, fmt in rows:
        lines.append(label.ljust(lw) + "  " + "  ".join(
            ("-" if cols[n].get(key) is None else fmt(cols[n][key])).rjust(w) for n, w in zip(names, cw)))
    return "\n".join(lines)


def compare(teacher_spec: str, students: list[str], data: str, formats=(), seq_len=256, max_examples=16,
            prefill_tokens=128, new_tokens=32, rounds=3, prompts=None, out_dir=None, progress=True,
            draft_tokens=0) -> dict:
    """draft_tokens > 0: also each student (not its GGUF files) as the teacher's draft model in
    speculative decoding (`draft.py`), drafting that many tokens per step, on the prompts."""
    from tqdm.auto import tqdm

    from stillroom.config import DataConfig
    from stillroom.data.examples import build_examples
    from stillroom.deploy.export import TYPES, write_gguf
    from stillroom.eval.evaluate import folder_bytes
    from stillroom.models import core as models

    bad = [f for f in formats if f not in TYPES]
    if bad:
        raise UserError(f"--formats {bad[0]}: choose from {', '.join(TYPES)}")
    if formats:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UserError("--formats needs llama-cpp-python (pip install llama-cpp-python) to run the GGUF "
                            "files") from None
    if not Path(data).exists():
        raise UserError(f"data file not found: {data}")
    paths = [models.run_model(s, "student") for s in students]
    teacher = models.load(teacher_spec)
    loaded = []
    for s, p in zip(students, paths):
        st = models.load(p)
        models.check_vocab(teacher.model, teacher.tokenizer, st.model, st.tokenizer)
        loaded.append((s, st))
    for m in [teacher, *(st for _, st in loaded)]:   # the quality numbers on the GPU when there is one
        m.model.to(best_device())
    tok = teacher.tokenizer
    examples, _ = build_examples(data, tok, DataConfig(path=data, seq_len=seq_len))
    examples = examples[:max_examples]
    stream = [t for e in examples for t in e.input_ids]
    if len(stream) < prefill_tokens:
        raise UserError(f"{data} holds {len(stream)} tokens, fewer than --prefill-tokens {prefill_tokens}")
    prompt = stream[:prefill_tokens]
    prompts = prompts or DEFAULT_PROMPTS
    gen_prompt = tok(prompts[0], add_special_tokens=False)["input_ids"]
    threads = torch.get_num_threads()
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="stillroom-compare-"))
    work.mkdir(parents=True, exist_ok=True)

    entries = [("teacher", "hf", teacher.path or teacher_spec, teacher.model)]
    for name, st in loaded:
        label = Path(name).name if Path(name).name != "final" else Path(name).parent.name
        entries.append((label, "hf", st.path, st.model))
        for f in formats:
            g = write_gguf(st.model, st.tokenizer, work / f"{label}-{f}.gguf", f, name=label)
            entries.append((f"{label} {f}", "gguf", g, st.model))
    cols, gens = {}, {}
    bar = tqdm(entries, desc="compare", unit="model", disable=not progress)
    for label, kind, path, model in bar:
        bar.set_postfix_str(label)
        col = {"params": models.num_params(model), "size_mb": (folder_bytes(path) or 0) / 2**20}
        col.update(measure(kind, path, prompt, gen_prompt, new_tokens, rounds, threads))
        if label != "teacher":
            if kind == "gguf":
                got = gguf_logits(path, examples)
                q = quality(teacher.model, examples, lambda i, e: got[i], tok)
            else:
                q = quality(teacher.model, examples,
                            lambda i, e: model(input_ids=torch.tensor([e.input_ids], device=model.device)).logits, tok)
            col.update({k: q[k] for k in ("perplexity", "bits_per_byte", "agreement", "kl_per_token")})
            teacher_ppl, teacher_bpb, held = q["teacher_perplexity"], q["teacher_bits_per_byte"], q["tokens"]
            if draft_tokens and kind == "hf":
                col.update(_as_draft(teacher.model, model, tok, prompts, new_tokens, draft_tokens, label))
        gens[label] = generations(kind, path, tok, prompts, new_tokens)
        cols[label] = col
    cols["teacher"]["perplexity"], cols["teacher"]["bits_per_byte"] = teacher_ppl, teacher_bpb
    result = {"columns": cols, "generations": {"prompts": prompts, **gens}, "held_out_tokens": held,
              "data": data, "prefill_tokens": prefill_tokens, "new_tokens": new_tokens, "threads": threads,
              "gguf_dir": str(work) if formats else None}
    return result


def _as_draft(teacher, student, tok, prompts, new_tokens, draft_tokens, label) -> dict:
    from stillroom.eval import draft

    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    d = draft.draft_check(teacher, student, ids, new_tokens, pad, draft_tokens, who=label)
    return {"draft_accepted_per_step": d["accepted_per_step"], "draft_acceptance": d["acceptance_rate"],
            "draft_speedup": d["speedup"], "draft_identical": f"{d['identical']}/{d['prompts']}"}


def render(result: dict) -> str:
    lines = [table(result["columns"]),
             f"(held-out: {result['held_out_tokens']:,} target tokens of {result['data']}; prefill of "
             f"{result['prefill_tokens']} tokens, {result['new_tokens']} greedy new tokens, {result['threads']} "
             "threads; GGUF rows run by llama.cpp)", ""]
    g = result["generations"]
    for i, p in enumerate(g["prompts"]):
        lines.append(f"prompt: {p}")
        for name, outs in g.items():
            if name != "prompts":
                lines.append(f"  {name:>14}: {outs[i][:160]!r}")
    return "\n".join(lines)
