"""How close did the student come to the teacher, at what size and speed.

On held-out examples (positions with a label): perplexity of each model, top-1 agreement of the
student with the teacher, mean KL(teacher || student) per token (T=1), and bits per byte (the
models' summed NLL over the UTF-8 bytes of the target tokens' text: comparable across tokenizers);
plus parameter counts, weight size, and greedy generation tokens/s of each model (batch 1, fixed
number of new tokens).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from stillroom.data.examples import collate, eval_batches, model_inputs
from stillroom.losses import IGNORE_INDEX, shift_labels, support_kl_rows
from stillroom.losses.core import _rows, auto_chunk_rows
from stillroom.models.core import num_params, weights_bytes
from stillroom.run.feedback import bar


def token_stats(student_logits, teacher_logits, labels, chunk=None):
    """No-grad sums over valid labels: student NLL, teacher NLL, KL(teacher || student) at T=1,
    and top-1 agreement count. Used by evaluation; chunked like the losses."""
    s2, t2 = _rows(student_logits), _rows(teacher_logits)
    chunk = chunk or auto_chunk_rows(s2.shape[1], s2.device)
    y = labels.reshape(-1)
    out = dict(student_nll=0.0, teacher_nll=0.0, kl=0.0, agree=0, tokens=0)
    with torch.no_grad():
        for a in range(0, s2.shape[0], chunk):
            s, t, yy = s2[a:a + chunk].float(), t2[a:a + chunk].float(), y[a:a + chunk]
            valid = yy != IGNORE_INDEX
            if not valid.any():
                continue
            s, t, yy = s[valid], t[valid], yy[valid]
            log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
            out["student_nll"] += -log_q.gather(-1, yy[:, None]).sum().item()
            out["teacher_nll"] += -log_p.gather(-1, yy[:, None]).sum().item()
            out["kl"] += support_kl_rows(log_q, log_p).sum().item()
            out["agree"] += (s.argmax(-1) == t.argmax(-1)).sum().item()
            out["tokens"] += int(valid.sum())
    return out


def folder_bytes(path: Path | None) -> int | None:
    """Bytes of weight files in a model folder (or of one file)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    files = [f for f in path.glob("*") if f.suffix in (".safetensors", ".bin", ".gguf")]
    return sum(f.stat().st_size for f in files) or None


@torch.no_grad()
def cached_stats(s, cached, labels, with_kl: bool, chunk=256) -> dict:
    """token_stats against a cached teacher: its perplexity from the stored label log-probs, its
    argmax from the top-1 id, and (at T = 1) the tail-bucket KL to its top-k -- a lower bound of
    the full KL (merging the tail into one bucket can only lose information)."""
    from stillroom.losses import TopK, forward_kl

    valid = labels != -100
    s, y = s[valid], labels[valid]
    ids, logp, tail = cached.top.ids[valid], cached.top.logp[valid], cached.top.log_tail[valid]
    out = dict(student_nll=0.0, teacher_nll=-float(cached.label_logp[valid].sum()), kl=0.0, agree=0,
               tokens=int(valid.sum()))
    for a in range(0, s.shape[0], chunk):
        sc = s[a:a + chunk].float()
        log_q = torch.log_softmax(sc, -1)
        out["student_nll"] += -float(log_q.gather(-1, y[a:a + chunk, None]).sum())
        out["agree"] += int((sc.argmax(-1) == ids[a:a + chunk, 0]).sum())
        if with_kl:
            out["kl"] += float(forward_kl(sc, TopK(ids[a:a + chunk], logp[a:a + chunk], tail[a:a + chunk])))
    if not with_kl:
        out["kl"] = None
    return out


def byte_counter(tokenizer):
    """f(labels (B, S) of target token ids, IGNORE_INDEX elsewhere) -> the UTF-8 bytes of those
    tokens' text. A byte-level BPE spells each byte as one character of its tokens, so a token's
    bytes are its length (an added token's: its written form's): one table, checked against
    decoding on sample texts once per tokenizer. Any other tokenizer decodes each run of targets."""
    from stillroom.data.render import once_per

    return once_per(tokenizer, ("bytes",), lambda: _make_byte_counter(tokenizer))


def _make_byte_counter(tokenizer):
    import numpy as np

    from tokenizers.decoders import ByteLevel

    table = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and isinstance(backend.decoder, ByteLevel):
        vocab = tokenizer.get_vocab()
        table = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
        added = {t.content for t in tokenizer.added_tokens_decoder.values()}
        for token, i in vocab.items():
            table[i] = len(token.encode("utf-8")) if token in added else len(token)
        samples = ["Hello, world!", " two  spaces\n\nand lines\t", "accents é, 日本語, emoji 🙂🙂",
                   f"{tokenizer.eos_token or ''} special text"]
        for text in samples:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if int(table[ids].sum()) != len(tokenizer.decode(ids).encode("utf-8")):
                table = None
                break

    def count(labels) -> int:
        """(the attribute by_table says which way it counts)"""
        if table is not None:
            y = labels[labels != IGNORE_INDEX].cpu().numpy()
            return int(table[y].sum())
        total = 0
        for row in labels.tolist():
            run = []
            for t in row + [IGNORE_INDEX]:
                if t != IGNORE_INDEX:
                    run.append(t)
                elif run:
                    total += len(tokenizer.decode(run).encode("utf-8"))
                    run = []
        return total
    count.by_table = table is not None
    return count


def _bpb(nll, n_bytes):
    return None if nll is None or not n_bytes else nll / math.log(2) / n_bytes


def on_device(batch: dict, model) -> dict:
    """The batch's tensors on the device of the model that reads them."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _versus(teacher, batch, host, labels, device, vocab):
    """The teacher's side of one held-out batch -> stats(student logits, cut to `vocab`): token_stats
    against a model's logits (it reads its inputs on its own device: offloaded, or placed apart),
    cached_stats against what reads top-k targets (a cache, a server)."""
    if not isinstance(teacher, torch.nn.Module):
        t = teacher.targets(batch, labels.shape[1], device)
        return lambda s: cached_stats(s, t, labels, with_kl=teacher.temperature == 1.0)
    t = teacher(**model_inputs(on_device(host, teacher)), use_cache=False).logits.to(device)
    t = t[..., :vocab] if vocab else t
    return lambda s: token_stats(s, t, labels)


@torch.no_grad()
def score(student, teacher, examples, pad_id, batch_size=8, max_batches=None, vocab=None, tokenizer=None):
    """Perplexity of both, top-1 agreement and mean KL(teacher || student) on `examples`, and with
    the student's `tokenizer` bits per byte. `teacher` is a model, or what reads top-k targets for
    a batch (a cache.TeacherCache, a served.ServedScorer)."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    count = byte_counter(tokenizer) if tokenizer is not None else None
    tot = dict(student_nll=0.0, teacher_nll=0.0, kl=0.0, agree=0, tokens=0, bytes=0)
    n_batches = -(-len(examples) // batch_size)
    for batch in bar(eval_batches(examples, batch_size, max_batches), desc="held-out eval", unit="batch",
                     total=min(n_batches, max_batches or n_batches)):
        host = collate(batch, pad_id)   # sent from here to each model's own device
        b = on_device(host, student)
        labels = shift_labels(b["labels"])
        s = student(**model_inputs(b), use_cache=False).logits
        if teacher is None:   # a teacher of another tokenizer: the student's own perplexity only
            stats = token_stats(s, s.detach(), labels)
            stats.update(teacher_nll=None, kl=None, agree=None)
        else:
            stats = _versus(teacher, batch, host, labels, device, vocab)(s[..., :vocab] if vocab else s)
        if count is not None:
            stats["bytes"] = count(labels)
        for k, v in stats.items():
            tot[k] = None if v is None or tot[k] is None else tot[k] + v
    student.train(was_training)
    n = max(tot["tokens"], 1)
    return {
        "tokens": tot["tokens"],
        "bytes": tot["bytes"] if count is not None else None,
        "student_perplexity": math.exp(tot["student_nll"] / n),
        "teacher_perplexity": None if tot["teacher_nll"] is None else math.exp(tot["teacher_nll"] / n),
        "agreement": None if tot["agree"] is None else tot["agree"] / n,
        "kl_per_token": None if tot["kl"] is None else tot["kl"] / n,
        "student_bits_per_byte": _bpb(tot["student_nll"], tot["bytes"]),
        "teacher_bits_per_byte": _bpb(tot["teacher_nll"], tot["bytes"]),
    }


@torch.no_grad()
def cross_bits_per_byte(teacher, t_tok, s_tok, examples, batch_size=8, max_batches=None) -> float | None:
    """A teacher of another tokenizer on the student's held-out examples, per byte: each example's
    text (as the student's tokenizer decodes it) tokenized for the teacher; the teacher's NLL of its
    tokens that start inside the characters of the student's target tokens, over those characters'
    UTF-8 bytes. So the two models are measured on the same text, each in its own tokens."""
    from stillroom.objectives.methods import char_ends, padded

    device = next(teacher.parameters()).device
    nll, n_bytes = 0.0, 0
    for batch in eval_batches(examples, batch_size, max_batches):
        encs, spans = [], []
        for e in batch:
            text = s_tok.decode(e.input_ids)
            prev, ranges = 0, []
            for k, end in enumerate(char_ends(s_tok, e.input_ids, text)):
                if end < 0:   # inside a character: its bytes go with the token that completes it
                    continue
                if k and e.labels[k] != IGNORE_INDEX and end > prev:
                    ranges.append((prev, end))
                prev = end
            n_bytes += sum(len(text[a:b].encode("utf-8")) for a, b in ranges)
            encs.append(t_tok(text, add_special_tokens=True, return_offsets_mapping=True))
            spans.append(ranges)
        ids, mask = padded([x["input_ids"] for x in encs], t_tok)
        logp = torch.log_softmax(teacher(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         use_cache=False).logits.float(), -1)
        for i, (x, ranges) in enumerate(zip(encs, spans)):
            for j in range(1, len(x["input_ids"])):
                start = x["offset_mapping"][j][0]
                if any(a <= start < b for a, b in ranges):
                    nll -= float(logp[i, j - 1, x["input_ids"][j]])
    return _bpb(nll, n_bytes)


@torch.no_grad()
def score_peers(peers: dict, teacher, examples, pad_id, batch_size=8, max_batches=None, vocab=None, tokenizer=None):
    """Co-distillation's eval in one pass: for each peer and for the ensemble (the mean of the
    peers' probabilities) perplexity, agreement and KL to the teacher; top-1 agreement of each
    pair of peers. `teacher`: a model, or what reads top-k targets (as in score).
    -> {"peers": {name: {...}}, "ensemble": {...}, "pairs": {"a/b": frac}, ...}"""
    names = list(peers)
    states = {n: m.training for n, m in peers.items()}
    for m in peers.values():
        m.eval()
    device = next(next(iter(peers.values())).parameters()).device   # the peers read the batches here
    zero = lambda: dict(student_nll=0.0, teacher_nll=0.0, kl=0.0, agree=0, tokens=0)  # noqa: E731
    tot = {n: zero() for n in names + ["ensemble"]}
    pairs = {(a, b): 0 for i, a in enumerate(names) for b in names[i + 1:]}
    count = byte_counter(tokenizer) if tokenizer is not None else None
    n_bytes = 0
    for batch in eval_batches(examples, batch_size, max_batches):
        host = collate(batch, pad_id)   # sent from here to each model's own device
        labels = shift_labels(host["labels"]).to(device)
        valid = labels != -100
        n_bytes += count(labels) if count is not None else 0
        stats = _versus(teacher, batch, host, labels, device, vocab)
        log_probs, top = {}, {}
        for n in names:
            s = peers[n](**model_inputs(on_device(host, peers[n])), use_cache=False).logits.to(device)
            s = s[..., :vocab] if vocab else s
            for k, v in stats(s).items():
                tot[n][k] += v
            log_probs[n] = torch.log_softmax(s.float(), -1)
            top[n] = s.argmax(-1)
            del s
        # log of the mean probability: a valid logits tensor for the ensemble
        ens = torch.logsumexp(torch.stack([log_probs[n] for n in names]), 0) - math.log(len(names))
        del log_probs
        for k, v in stats(ens).items():
            tot["ensemble"][k] += v
        for a, c in pairs:
            pairs[(a, c)] += int(((top[a] == top[c]) & valid).sum())
    for n, m in peers.items():
        m.train(states[n])
    n_tok = max(tot["ensemble"]["tokens"], 1)

    def summary(x):
        return {"perplexity": math.exp(x["student_nll"] / n_tok), "bits_per_byte": _bpb(x["student_nll"], n_bytes),
                "agreement": x["agree"] / n_tok, "kl_per_token": x["kl"] / n_tok}
    return {"tokens": tot["ensemble"]["tokens"], "teacher_perplexity": math.exp(tot[names[0]]["teacher_nll"] / n_tok),
            "teacher_bits_per_byte": _bpb(tot[names[0]]["teacher_nll"], n_bytes),
            "peers": {n: summary(tot[n]) for n in names}, "ensemble": summary(tot["ensemble"]),
            "pairs": {f"{a}/{c}": v / n_tok for (a, c), v in pairs.items()}}


@torch.no_grad()
def generation_speed(model, prompts_ids: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """Greedy decoding tokens/s at batch 1 (one untimed warm-up run first)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              temperature=None, top_p=None, top_k=None, pad_token_id=pad_id)
    first = torch.tensor([prompts_ids[0]], device=device)
    model.generate(first, attention_mask=torch.ones_like(first), **{**kw, "max_new_tokens": 2,
                                                                    "min_new_tokens": 2})
    made, spent = 0, 0.0
    for ids in bar(prompts_ids, desc="generation speed", unit="prompt"):
        x = torch.tensor([ids], device=device)
        synchronize(device)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
        synchronize(device)   # the device's work done, not only queued
        spent += time.perf_counter() - t0
        made += out.shape[1] - x.shape[1]
    model.train(was_training)
    return made / spent


def synchronize(device):
    """Wait for the device's queued work (a timer read after it measures the work, not its launch)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def describe(model, path=None) -> dict:
    on_disk = folder_bytes(path)
    return {"params": num_params(model),
            "size_mb": round((on_disk or weights_bytes(model)) / 2**20, 1)}


def speed_prompts(examples, n: int, length: int = 32) -> list[list[int]]:
    """The first tokens of the first n examples: prompts for timing generation."""
    return [e.input_ids[:length] for e in examples[:n]]


def teacher_column(teacher, path, cmp, ecfg, prompts, pad_id, speed: bool = True) -> dict:
    """speed=False: no generation speed (a sharded teacher generates only with every process)."""
    return {"perplexity": cmp["teacher_perplexity"], "bits_per_byte": cmp.get("teacher_bits_per_byte"),
            "agreement": None, "kl_per_token": None, **describe(teacher, path),
            "gen_tokens_per_s": generation_speed(teacher, prompts, ecfg.gen_tokens, pad_id) if speed else None}


def student_column(student, path, cmp, ecfg, prompts, pad_id) -> dict:
    return {"perplexity": cmp["student_perplexity"], "bits_per_byte": cmp.get("student_bits_per_byte"),
            "agreement": cmp["agreement"], "kl_per_token": cmp["kl_per_token"], **describe(student, path),
            "gen_tokens_per_s": generation_speed(student, prompts, ecfg.gen_tokens, pad_id)}


def columns(student, teacher, held, ecfg, vocab, tok, *, t_tok=None, with_teacher=True, cmp=None,
            student_path=None) -> tuple[dict, int]:
    """The evaluation table's columns, {"teacher": ..., "student": ...}, and the held-out target
    tokens: for `stillroom eval` and before and after training. teacher: a teachers.core teacher
    (live or cached: it says what the evaluation reads and fills its own column); tok: the
    tokenizer the held-out examples are in (the student's). t_tok: the teacher's tokenizer when it
    is another (cross-tokenizer): each model is then measured in its own tokens on the same text,
    per byte (per-token perplexities, agreement and KL do not compare across vocabularies).
    cmp: the comparison when taken already (by every process, with a sharded teacher)."""
    cross = t_tok is not None
    pad_id = tok.pad_token_id
    if cmp is None:
        cmp = score(student, None if cross else teacher.eval_source(), held, pad_id, ecfg.batch_size,
                    ecfg.max_batches, vocab, tokenizer=tok)
    prompts = speed_prompts(held, ecfg.gen_prompts)
    cols = {}
    if with_teacher and cross:   # the teacher in its own tokens, on the same text: per byte
        cmp = {**cmp, "teacher_bits_per_byte": cross_bits_per_byte(teacher.model, t_tok, tok, held, ecfg.batch_size,
                                                                    ecfg.max_batches)}
        t_prompts = [t_tok(tok.decode(p), add_special_tokens=False)["input_ids"] for p in prompts]
        cols["teacher"] = teacher.column(cmp, ecfg, t_prompts, t_tok.pad_token_id)
    elif with_teacher:
        cols["teacher"] = teacher.column(cmp, ecfg, prompts, pad_id)
    cols["student"] = student_column(student, student_path, cmp, ecfg, prompts, pad_id)
    return cols, cmp["tokens"]


def _num(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"


ROWS = [("perplexity", "perplexity (held-out)", _num),
        ("bits_per_byte", "bits per byte (held-out)", "{:.4f}".format),
        ("agreement", "top-1 agreement w/ teacher", "{:.1%}".format),
        ("kl_per_token", "KL(teacher||student)/token", "{:.4f}".format),
        ("params", "parameters", "{:,}".format),
        ("size_mb", "weights MB", "{:.1f}".format),
        ("gen_tokens_per_s", "generation tokens/s", "{:.1f}".format)]


def table(columns: dict[str, dict], tokens: int | None = None) -> str:
    """Columns (name -> metrics) as one fixed-width text table."""
    names = list(columns)
    width = max(len(r[1]) for r in ROWS)
    cw = [max(12, len(n)) for n in names]
    lines = [" " * width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, cw))]
    for key, label, fmt in ROWS:
        cells = []
        for n, w in zip(names, cw):
            v = columns[n].get(key)
            cells.append(("-" if v is None else fmt(v)).rjust(w))
        lines.append(label.ljust(width) + "  " + "  ".join(cells))
    if tokens is not None:
        lines.append(f"(held-out: {tokens:,} target tokens)")
    return "\n".join(lines)
