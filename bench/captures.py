"""Offline teacher targets, byte for byte: stillroom's cache (plain and packed) against DistillKit's
compressed layouts and top-k renormalized without a tail (issue 31 item 4).

    .venv/bin/python bench/captures.py [--examples 24] [--train [--steps 60] [--seeds 0,1,2]] [--write]

Part 1, reconstruction. The bundled teacher (SmolLM2-135M-Instruct, fp32, vocab 49,152) over
held-out Alpaca rows from ../shared/data (the last --examples rows, chat-rendered, 256 tokens at
most), every position with a loss. For each layout, per position:

  bytes       what one position costs: stillroom's float16/float32 cache k x (2-byte id + the
              log-prob dtype) + 8 (the tail's log-mass and the true token's log-prob, float32); its
              packed cache, the tensors teachers/packing.py writes for these rows (ids, log-prob
              grid, range, tail and true token); DistillKit's compressed_logprobs row
              (teachers/distillkit.py's encoder, from the format's spec) + its ids bit-packed in
              ceil(log2 49152) = 16 bits;
  KL          KL(teacher || reconstruction), nats, over the whole vocabulary: the reconstruction is
              the stored top-k probabilities and the rest of the mass spread evenly over the other
              tokens (stillroom stores that mass; DistillKit's import takes 1 - sum(top-k), as
              stillroom's importer does), normalized to sum to 1 (so errors of opposite sign do not
              cancel); top-k renormalized puts nothing outside the top-k, so its KL is infinite:
              the mass it drops is printed instead;
  top-1       the reconstruction's most likely token is the teacher's;
  |dlogp|     mean absolute error of the stored top-k log-probs against the teacher's.

DistillKit's layouts are its README's: "default" (k 128, 16 exact bf16, a fit of t^0..t^4 and
sqrt t in fp32) and "budget" (k 50, 1 exact bf16, a fit of 1, t, sqrt t).

Part 2 (--train), training. A float32 top-160 cache of the teacher over TinyStories blocks
(../shared/data/tinystories, 256 tokens, --train-examples, 10% held out), turned into each layout's
targets (stillroom's caches written by its own writer; DistillKit's by its encoder and decoder, the
tail as its importer sets it; top-64 renormalized with no tail), then the same student (4 layers,
hidden 256, random init) trained --steps steps x 4 x 256 tokens by KD alone (alpha 1, T 1) from
each, by stillroom.run.distill: held-out perplexity on the true tokens, per seed (a seed gives every
layout the same init, split and batches), and its ratio to the default cache's.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_subset" / "alpaca_4500.jsonl"
TRAIN_DATA = DATA.parents[1] / "tinystories" / "tinystories_valid_head.txt"
V = 49152
DISTILLKIT = {
    "default": {"d": V, "k": 128, "exact_k": 16, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
                "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "normalize_t": False},
    "budget": {"d": V, "k": 50, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
               "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "normalize_t": False},
}


def teacher_rows(examples, model, kmax: int):
    """-> (top-kmax log-probs (N, kmax) float64, their ids, sum p log p over the vocabulary (N,))
    at every position with a loss, fp32 teacher."""
    from stillroom.teachers.cache import positions

    lps, ids, plogp = [], [], []
    for e in examples:
        pos = positions(e)
        if not pos:
            continue
        with torch.no_grad():
            lp = model(input_ids=torch.tensor([e.input_ids])).logits[0, pos].float().log_softmax(-1)
        top = lp.topk(kmax)
        lps.append(top.values.double())
        ids.append(top.indices)
        plogp.append((lp.exp() * lp).double().sum(-1))
    return torch.cat(lps).numpy(), torch.cat(ids).numpy(), torch.cat(plogp).numpy()


def measure(true_lp, got_lp, plogp, with_tail: bool = True, stored_tail=None) -> dict:
    """KL(teacher || the reconstruction) over the vocabulary, top-1 agreement, mean |d log p| (the
    first k columns of true_lp are the stored ones, in order). stored_tail: the tail's log-mass as
    stored (stillroom's cache); else 1 - the stored top-k's mass. The reconstruction is normalized
    (stored top-k and tail scaled to sum to 1) before the KL, so errors of opposite sign cannot
    cancel in it."""
    k = got_lp.shape[1]
    p = np.exp(true_lp[:, :k])
    rest = np.clip(1 - p.sum(-1), 0, None)                      # the teacher's mass outside the top-k
    out = {"top1": float(np.mean(got_lp.argmax(-1) == 0)), "dlogp": float(np.abs(got_lp - true_lp[:, :k]).mean())}
    if not with_tail:
        out.update(kl=math.inf, dropped=float(rest.mean()))
        return out
    q_rest = (np.exp(stored_tail) if stored_tail is not None
              else np.clip(1 - np.exp(got_lp).sum(-1), 1e-12, None))   # stored, or derived
    z = np.exp(got_lp).sum(-1) + q_rest
    top_kl = (p * (true_lp[:, :k] - got_lp + np.log(z)[:, None])).sum(-1)
    rest_plogp = plogp - (p * true_lp[:, :k]).sum(-1)           # sum over the rest of p log p
    kl = top_kl + rest_plogp - rest * np.log(q_rest / z / (V - k))
    out.update(kl=float(kl.mean()), dropped=0.0)
    return out


def tail_of(true_lp, k, dtype) -> np.ndarray:
    """The tail's log-mass as a cache stores it (the teacher's, in dtype)."""
    rest = np.clip(1 - np.exp(true_lp[:, :k]).sum(-1), 1e-30, None)
    return np.log(rest).astype(dtype).astype(np.float64)


def packed(true_lp, true_ids, k):
    """The packed cache's bytes a position and its log-probs, in the teacher's top-k order."""
    from stillroom.teachers.packing import Layout

    layout, n = Layout("packed", V, k), len(true_lp)
    t = layout.encode(torch.from_numpy(true_ids[:, :k]), torch.from_numpy(true_lp[:, :k]),
                      torch.from_numpy(tail_of(true_lp, k, np.float32)), torch.zeros(n))
    ids, lp, tail, _ = layout.decode(t)
    a, b = np.argsort(true_ids[:, :k], 1), np.argsort(ids.numpy(), 1)   # the same ids: match them up
    got = np.empty((n, k))
    rows = np.arange(n)[:, None]
    got[rows, a] = lp.double().numpy()[rows, b]
    size = sum(v.numel() * v.element_size() for name, v in t.items() if name != "code_bytes")
    return size / n, got, tail.double().numpy()


def derive(src, dst: Path, examples, k: int, dtype: str, fn):
    """A cache at dst holding fn(top-k ids, top-k log-probs, tail) of src's rows (the teacher's
    float32 top-K, K >= k), in `dtype`: the same samples, tokenizer and teacher config."""
    import shutil

    from stillroom.teachers.cache import ShardWriter, positions, sample_id, write_json

    dst.mkdir(parents=True)
    for sub in ("tokenizer", "teacher"):
        shutil.copytree(src.path / sub, dst / sub)
    index = {**src.index, "top_k": k, "dtype": dtype, "shards": [], "complete": False}
    writer, done = ShardWriter(dst, index, 1 << 20), set()
    for e in examples:
        sid = sample_id(e)
        if sid in done or not positions(e):
            continue
        done.add(sid)
        ids, lp, tail, label = src.rows(e)
        lp, tail = lp.double(), tail.double()
        rest = torch.logaddexp(tail, torch.logsumexp(lp[:, k:], -1)) if k < lp.shape[1] else tail
        writer.add(sid, *fn(ids[:, :k].long(), lp[:, :k], rest), label)
    writer.flush()
    index["complete"] = True
    write_json(dst / "index.json", index)
    return dst


@torch.no_grad()
def sampled_cache(model, examples, dst: Path, src, n: int, seed: int):
    """Sparse logit sampling (Anshumann et al., ACL 2025, its unbiased form): n tokens drawn from
    the teacher's full distribution at each position, stored as the distinct ids with log(count / n)
    and no tail. The target is the empirical distribution of the draws, whose expectation is the
    teacher's, so the KD gradient (linear in the target) is unbiased."""
    import shutil

    from stillroom.teachers.cache import ShardWriter, positions, sample_id, write_json

    dst.mkdir(parents=True)
    for sub in ("tokenizer", "teacher"):
        shutil.copytree(src.path / sub, dst / sub)
    index = {**src.index, "top_k": n, "dtype": "float16", "shards": [], "complete": False}
    writer, done, g = ShardWriter(dst, index, 1 << 20), set(), torch.Generator().manual_seed(seed)
    for e in examples:
        sid = sample_id(e)
        if sid in done or not positions(e):
            continue
        done.add(sid)
        pos = positions(e)
        lp = model(input_ids=torch.tensor([e.input_ids])).logits[0, pos].float().log_softmax(-1)
        draws = torch.multinomial(lp.exp(), n, replacement=True, generator=g)            # (P, n)
        ids = torch.zeros(len(pos), n, dtype=torch.long)
        logp = torch.full((len(pos), n), -math.inf)
        for r, row in enumerate(draws):
            u, c = row.unique(return_counts=True)
            spare = [i for i in range(n + len(u)) if i not in set(u.tolist())][:n - len(u)]   # distinct, unused
            ids[r] = torch.cat([u, torch.tensor(spare, dtype=torch.long)])
            logp[r, :len(u)] = (c.double() / n).log()
        label = lp.gather(1, torch.tensor(e.labels)[torch.tensor(pos) + 1][:, None]).squeeze(1)
        writer.add(sid, ids, logp, torch.full((len(pos),), -math.inf), label)
    writer.flush()
    index["complete"] = True
    write_json(dst / "index.json", index)
    return dst


def train_part(args, sizes: dict):
    """The same student trained from each layout at equal steps: held-out perplexity."""
    import tempfile

    from stillroom.recipes import load_config
    from stillroom.data.store import load_data
    from stillroom.models import core as models
    from stillroom.run.distill import distill
    from stillroom.teachers import distillkit
    from stillroom.teachers.cache import TeacherCache, build

    def dk(cfg):
        def fn(ids, lp, rest):
            got = torch.from_numpy(distillkit.decode_logprobs(distillkit.encode_logprobs(lp.numpy(), cfg), cfg))
            return ids, got, torch.log1p(-got.exp().sum(-1).clamp(max=1 - 1e-6))   # the importer's tail
        return fn

    def renorm(ids, lp, rest):
        return ids, lp - torch.logsumexp(lp, -1, keepdim=True), torch.full_like(rest, -math.inf)

    arms = [("stillroom top-64 float16 (the default)", 64, "float16", lambda i, lp, r: (i, lp, r)),
            ("stillroom top-160 packed", 160, "packed", lambda i, lp, r: (i, lp, r)),
            ("DistillKit default (k 128)", 128, "float32", dk(DISTILLKIT["default"])),
            ("DistillKit budget (k 50)", 50, "float32", dk(DISTILLKIT["budget"])),
            ("top-64 renormalized, no tail", 64, "float32", renorm)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = [f"data.path={args.train_data}", "data.seq_len=256", f"data.max_examples={args.train_examples}",
                "data.eval_fraction=0.1", "student.init=config", "student.hidden_size=256", "student.num_layers=4",
                "student.num_heads=4", "loss.temperature=1.0", "loss.alpha=1.0", f"train.max_steps={args.steps}",
                "train.batch_size=4", "train.lr=2e-3", "train.warmup_steps=5", "eval.gen_prompts=1",
                "eval.gen_tokens=4", f"train.log_every={args.steps}"]
        cfg = load_config(None, base + [f"cache.path={tmp / 'full'}", "cache.top_k=160", "cache.dtype=float32"])
        teacher = models.load("smollm2-135m")
        train, held = load_data(cfg, teacher.tokenizer)
        build(cfg, train + held, teacher.model, teacher.tokenizer, progress=False)
        full = TeacherCache(tmp / "full")
        samples = sampled_cache(teacher.model, train + held, tmp / "sampled", full, args.samples, 0)
        del teacher
        print(f"\nthe same student (4 layers, hidden 256, random init) trained {args.steps} steps x 4 x "
              f"256 tokens by KD alone (alpha 1, T 1) from each layout's targets; {len(train)} training / {len(held)} "
              f"held-out blocks of {args.train_data.name}")
        print(f"{'':40}{'bytes':>7}" + "".join(f"{'seed ' + str(sd):>12}" for sd in args.seeds) +
              f"{'ratio to the default':>22}")
        got = {}
        arms.append((f"{args.samples} tokens sampled from the teacher", None, None, None))
        for name, k, dtype, fn in arms:
            path = (samples if k is None else
                    derive(full, tmp / name.split(" (")[0].replace(" ", "_"), train + held, k, dtype, fn))
            got[name] = [distill(load_config(None, base + ["teacher.kind=cache", f"teacher.cache={path}",
                                                           f"train.seed={sd}", f"train.output_dir={tmp / 'run'}"]),
                                 overwrite=True, progress=False)["eval"]["student after"]["perplexity"]
                         for sd in args.seeds]
            ratios = [p / d for p, d in zip(got[name], got[arms[0][0]])]
            print(f"{name:<40}{sizes[name if k else 'sampled']:>7}" + "".join(f"{p:>12.3f}" for p in got[name]) +
                  f"{'  ' + ' '.join(f'{r:.4f}' for r in ratios):>22}")
        print("(held-out perplexity on the true tokens; each seed gives every arm the same init and batches; bytes a "
              f"position as in the table above, the sampled targets as a float16 cache of k {args.samples})")


def main():
    from stillroom.cli import _quiet_libraries
    from stillroom.config import DataConfig
    from stillroom.data.examples import build_examples
    from stillroom.models import core as models
    from stillroom.teachers import distillkit

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--train", action="store_true", help="also train a student from each layout (minutes)")
    ap.add_argument("--train-data", type=Path, default=TRAIN_DATA)
    ap.add_argument("--train-examples", type=int, default=300)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=lambda x: [int(a) for a in x.split(",")], default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=12, help="tokens drawn a position for the sampling arm")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"this bench reads {args.data}, which is not here")
    _quiet_libraries()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = models.load("smollm2-135m", dtype=torch.float32)
    examples, _ = build_examples(str(args.data), teacher.tokenizer, DataConfig(path=str(args.data), seq_len=256,
                                                                                     skip_bad_rows=True))
    examples = examples[-args.examples:]
    true_lp, true_ids, plogp = teacher_rows(examples, teacher.model, 192)
    n = len(true_lp)
    rows = []
    for k in (16, 32, 64, 128):
        for dtype, width in (("float16", 2), ("float32", 4)):
            got = torch.tensor(true_lp[:, :k]).to(getattr(torch, dtype)).double().numpy()
            rows.append((f"stillroom cache, top-{k} {dtype}", k * (2 + width) + 8,
                         measure(true_lp, got, plogp, stored_tail=tail_of(true_lp, k, np.float32))))
    for k in (128, 160, 192):
        size, got, tail = packed(true_lp, true_ids, k)
        rows.append((f"stillroom cache, top-{k} packed", round(size), measure(true_lp, got, plogp, stored_tail=tail)))
    for name, cfg in DISTILLKIT.items():
        k = cfg["k"]
        data = distillkit.encode_logprobs(true_lp[:, :k], cfg)
        got = distillkit.decode_logprobs(data, cfg)
        rows.append((f"DistillKit {name} (k {k})", data.shape[1] + -(-k * distillkit.index_bits(V) // 8),
                     measure(true_lp, got, plogp)))
    for k in (50, 64):
        got = torch.tensor(true_lp[:, :k]).half().double().numpy()
        renorm = got - np.log(np.exp(got).sum(-1, keepdims=True))
        rows.append((f"top-{k} fp16 renormalized, no tail", k * 4, measure(true_lp, renorm, plogp, with_tail=False)))
    print(f"\n{n:,} positions with a loss, {len(examples)} held-out Alpaca rows (the last of {args.data.name}), "
          f"bundled teacher in fp32, vocab {V:,}")
    print(f"{'':40}{'bytes':>7}{'KL(teacher||rec.)':>19}{'top-1':>8}{'|dlogp|':>10}{'mass dropped':>14}")
    for name, b, m in rows:
        kl = "inf" if math.isinf(m["kl"]) else f"{m['kl']:.5f}"
        print(f"{name:<40}{b:>7}{kl:>19}{m['top1']:>8.1%}{m['dlogp']:>10.5f}{m['dropped']:>14.4f}")
    print(f"(dense fp16: {V * 2:,} bytes a position)")
    if args.train:
        sizes = {name: b for name, b, _ in rows}
        train_part(args, {"stillroom top-64 float16 (the default)": sizes["stillroom cache, top-64 float16"],
                          "stillroom top-160 packed": sizes["stillroom cache, top-160 packed"],
                          "DistillKit default (k 128)": sizes["DistillKit default (k 128)"],
                          "DistillKit budget (k 50)": sizes["DistillKit budget (k 50)"],
                          "top-64 renormalized, no tail": sizes["top-64 fp16 renormalized, no tail"],
                          "sampled": args.samples * 4 + 8})


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import results
    results.main(main, "captures", "Offline targets against DistillKit's layouts (bench/captures.py)")
