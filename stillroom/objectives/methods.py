"""The methods beyond the seed's hybrid, as pieces of one training step.

- weighted lists of loss terms (`loss.terms`): CE, any divergence, hard labels, hidden-state and
  attention transfer, each with its weight;
- several teachers (`teacher.mix`): a weighted mixture of their distributions, or routing by a
  data field (`teacher.route_field`); each live or cached, optionally offloaded between uses;
- on-policy distillation (GKD): on a fraction of steps the student writes the continuations;
- cross-tokenizer teachers (`loss.cross_tokenizer=uld`): ULD + exact-match alignment;
- intermediate layers: hidden-state cosine / MSE through learned projections, attention maps;
- adaptive: per-token weights from the teacher's confidence or entropy, automatic balancing of the
  teacher terms against CE.

These are the pieces; the objectives (core.py) put them into a training step. The common
losses (CE + one divergence or hard labels, one teacher) take the fast kernel (`objectives.Hybrid`);
the rest take `losses.distill_loss`'s general engine on the models' full logits (chunked, one
chunk's memory).
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass

import torch

from stillroom.data.examples import Example, to_batch
from stillroom.errors import UserError
from stillroom.models import core as models
from stillroom.objectives.rules import FEATURE_TERMS
from stillroom.losses import (DIVERGENCES, IGNORE_INDEX, attention_loss, hidden_loss)

log = logging.getLogger("stillroom")

TERM_NAMES = ("ce", "hard", *DIVERGENCES, *FEATURE_TERMS)


# ------------------------------------------------------------------------------------ on-policy

def on_policy_step(cfg, step: int) -> bool:
    """Is optimizer step `step` on-policy? A pure function of (seed, step): resume stays exact."""
    lam = cfg.loss.on_policy
    return lam > 0 and (lam >= 1 or random.Random(cfg.train.seed * 7919 + step).random() < lam)


def prompt_of(e: Example, prompt_tokens: int) -> list[int]:
    """The prompt of an example: its tokens before the first target (prompt/response, chat); for
    text (every token a target) its first `prompt_tokens`. A packed row: its first document."""
    n = e.segments[0] if e.segments else len(e.input_ids)
    ids, labels = e.input_ids[:n], e.labels[:n]
    first = next((i for i in range(1, n) if labels[i] != IGNORE_INDEX), n)
    if first <= 1:
        first = min(prompt_tokens, max(1, n - 1))
    return ids[:first]


@torch.no_grad()
def rollout(student, examples: list[Example], cfg, pad_id: int, eos_id, seed: int) -> list[Example]:
    """GKD's on-policy data: the student samples a continuation of each example's prompt; the new
    example is prompt + continuation, with targets on the continuation only, up to and including
    its first EOS (the prompt and everything after EOS are masked)."""
    lc = cfg.loss
    prompts = [prompt_of(e, lc.on_policy_prompt_tokens) for e in examples]
    width = max(map(len, prompts))
    dev = next(student.parameters()).device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=dev)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):   # left padding, so every prompt ends where generation starts
        ids[i, width - len(p):] = torch.tensor(p, device=dev)
        att[i, width - len(p):] = 1
    was = student.training
    student.eval()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        sample = lc.on_policy_temperature > 0
        from stillroom.run.shard import is_sharded
        # a sharded student's every forward is taken by all processes together: synced_gpus keeps a
        # process that finished early stepping (its outputs discarded) until all have finished
        out = student.generate(input_ids=ids, attention_mask=att, max_new_tokens=lc.on_policy_tokens,
                               do_sample=sample, temperature=lc.on_policy_temperature if sample else None,
                               top_k=0 if sample else None, top_p=1.0 if sample else None,
                               pad_token_id=pad_id, eos_token_id=eos_id,
                               **({"synced_gpus": True} if is_sharded(student) else {}))
    student.train(was)
    new = []
    for i, p in enumerate(prompts):
        gen = out[i, width:].tolist()
        if eos_id is not None and eos_id in gen:
            gen = gen[:gen.index(eos_id) + 1]
        gen = gen or ([eos_id] if eos_id is not None else [pad_id])
        new.append(Example(list(p) + gen, [IGNORE_INDEX] * len(p) + gen))
    return new


# ------------------------------------------------------------------------------------ cross-tokenizer

def _strings(tok) -> dict[str, int]:
    """Token string (as text, its leading space explicit) -> id, for a tokenizer's ordinary tokens
    (special tokens left out). Each piece is read after an anchor piece ('a'), so a decoder that
    strips the leading space of the text (SentencePiece's) keeps it: '▁the' reads ' the', not
    'the', and never collides with the bare subword."""
    special = set(tok.all_special_ids)
    vocab = tok.get_vocab()
    anchor = next((p for p in ("a", "x", "e") if p in vocab and tok.convert_tokens_to_string([p]) == p), None)

    def text(piece):
        if anchor is None:
            return tok.convert_tokens_to_string([piece])
        s = tok.convert_tokens_to_string([anchor, piece])
        return s[len(anchor):] if s.startswith(anchor) else tok.convert_tokens_to_string([piece])

    out = {}
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i in special:
            continue
        s = text(piece)
        if s and "\ufffd" not in s:
            out.setdefault(s, i)
    return out


def _strings_key(tok) -> str:
    """What _strings reads: the whole vocabulary (its hash), the decoder and the special ids."""
    from stillroom.teachers.cache import tokenizer_hash
    decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
    return f"{tokenizer_hash(tok)} {decoder.__getstate__() if decoder is not None else type(tok).__name__} " \
           f"{sorted(tok.all_special_ids)}"


def vocab_match(s_tok, t_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of tokens whose text both vocabularies share ('Ġthe' and '▁the'
    are both ' the'); cached on disk under a hash of both whole tokenizers (the mapping of a 262k
    vocabulary takes seconds)."""
    key = hashlib.sha1(f"match/2 {_strings_key(s_tok)} {_strings_key(t_tok)}".encode()).hexdigest()[:16]
    path = models.cache_dir() / "vocab-match" / f"{key}.pt"
    if path.is_file():
        d = torch.load(path)
        return d["student"], d["teacher"]
    s, t = _strings(s_tok), _strings(t_tok)
    shared = sorted(set(s) & set(t), key=lambda k: s[k])
    pair = (torch.tensor([s[k] for k in shared], dtype=torch.long),
            torch.tensor([t[k] for k in shared], dtype=torch.long))
    try:   # a cache that cannot be written costs the mapping's seconds again next time, nothing more
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"student": pair[0], "teacher": pair[1]}, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as e:
        log.warning("vocab match not cached in %s (%s)", path.parent, e)
    return pair


def whole_ends(offsets) -> list[int]:
    """Character end offsets of tokens, -1 for a token that ends inside a character: a byte-level
    BPE splits a CJK character or an emoji into several tokens, all given the character's span, so
    a token whose successor starts before its end has not finished its character."""
    out = []
    for i, (_, end) in enumerate(offsets):
        nxt = offsets[i + 1][0] if i + 1 < len(offsets) else None
        out.append(end if nxt is None or nxt >= end else -1)
    return out


def char_ends(tok, ids: list[int], text: str) -> list[int]:
    """For each token, the number of characters of `text` it and the tokens before it spell (-1
    where a prefix does not decode to a prefix of the text: a character split across tokens)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] == list(ids):
        return whole_ends(enc["offset_mapping"])
    ends = []
    for i in range(len(ids)):
        pre = tok.decode(ids[:i + 1])
        ends.append(len(pre) if text.startswith(pre) else -1)
    return ends


@dataclass
class Aligned:
    """A batch re-tokenized for a cross-tokenizer teacher: its inputs, and the pairs (student row,
    teacher row) of flattened positions where both have read exactly the same text."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    s_rows: torch.Tensor
    t_rows: torch.Tensor


def padded(seqs: list[list[int]], tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, attention mask), right-padded with the tokenizer's pad id (0 if none)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x)
        att[i, :len(x)] = 1
    return ids, att


def align(examples: list[Example], targets: torch.Tensor, s_tok, t_tok, device) -> Aligned:
    """Student position i (which predicts token i + 1) and teacher position j are aligned when the
    text up to and including token i equals the text up to and including teacher token j: both
    then predict what follows the same characters. Only student positions with a target count."""
    t_ids, s_rows, t_rows = [], [], []
    S = targets.shape[1]
    labelled = (targets != IGNORE_INDEX).tolist()   # one copy to the host, not one read per position
    for bi, e in enumerate(examples):
        text = s_tok.decode(e.input_ids)
        s_end = char_ends(s_tok, e.input_ids, text)
        enc = t_tok(text, add_special_tokens=True, return_offsets_mapping=True)
        t_ids.append(enc["input_ids"])
        last = {}   # character end -> the teacher position that has read exactly that text
        for j, b in enumerate(whole_ends(enc["offset_mapping"])):
            if b > 0:
                last[b] = j
        for i, end in enumerate(s_end):
            if i < S and labelled[bi][i] and end > 0 and end in last:
                s_rows.append(bi * S + i)
                t_rows.append((bi, last[end]))
    ids, att = padded(t_ids, t_tok)
    width = ids.shape[1]
    flat = [bi * width + j for bi, j in t_rows]
    return Aligned(ids.to(device), att.to(device), torch.tensor(s_rows, dtype=torch.long, device=device),
                   torch.tensor(flat, dtype=torch.long, device=device))


# ------------------------------------------------------------------------------------ intermediate layers

def layer_map(cfg, s_layers: int, t_layers: int, kept: list[int] | None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for the hidden-state and attention terms: loss.layer_map,
    else each student layer with the teacher layer it was cut from (student.init=from_teacher), else
    the student's layers spread evenly over the teacher's (last to last)."""
    if cfg.loss.layer_map:
        pairs = [tuple(p) for p in cfg.loss.layer_map]
        for s, t in pairs:
            if not (0 <= s < s_layers and 0 <= t < t_layers):
                raise UserError(f"loss.layer_map pair [{s}, {t}]: the student has layers 0..{s_layers - 1}, "
                                f"the teacher 0..{t_layers - 1}")
        return pairs
    if kept and len(kept) == s_layers:
        return list(enumerate(kept))
    return [(i, round((i + 1) * t_layers / s_layers) - 1) for i in range(s_layers)]


class Projections(torch.nn.Module):
    """One learned linear map per mapped layer, student width -> teacher width (TinyBERT's W_h),
    identity-initialised when the widths agree. Trained with the student, saved with the run."""

    def __init__(self, pairs, s_width: int, t_width: int):
        super().__init__()
        self.pairs = [list(p) for p in pairs]
        self.maps = torch.nn.ModuleList(torch.nn.Linear(s_width, t_width, bias=False) for _ in pairs)
        if s_width == t_width:
            for m in self.maps:
                torch.nn.init.eye_(m.weight)


def use_eager_attention(model):
    """Attention maps need the eager implementation (sdpa and flash never form them)."""
    model = getattr(model, "module", model)
    model.set_attn_implementation("eager")


def feature_loss(terms, s_out, t_out, proj, pairs, mask, parts: dict) -> torch.Tensor:
    """Sum of the weighted hidden-state / attention terms over labelled positions, each term the
    mean over the mapped layer pairs; `parts` accumulates each term's raw sum. Hidden states are
    layer outputs: hidden_states[l + 1] is layer l's (index 0 is the embeddings)."""
    total = 0.0
    for name, kind in FEATURE_TERMS.items():
        w = terms.get(name)
        if not w:
            continue
        term = 0.0
        for k, (s, t) in enumerate(pairs):
            if kind:
                term = term + hidden_loss(s_out.hidden_states[s + 1], t_out.hidden_states[t + 1], mask, kind,
                                          None if proj is None else proj.maps[k])
            else:
                term = term + attention_loss(s_out.attentions[s], t_out.attentions[t], mask)
        term = term / len(pairs)
        parts[name] = parts.get(name, 0.0) + float(term.detach())
        total = total + w * term
    return total


def on_policy_batches(student, batches, cfg, pad_id, eos_id, indices, device):
    """The step's batches replaced by the student's own continuations of their prompts. Each
    micro-batch samples with a seed of its *global* index (`indices`, train.window_indices), so a
    micro-batch rolls out the same wherever it runs: any (processes x grad_accum) split of a
    step gives the same rollouts, and no two micro-batches share a seed."""
    out = []
    for j, b in zip(indices, batches):
        new = rollout(student, b.examples, cfg, pad_id, eos_id, seed=cfg.train.seed * 1_000_003 + j)
        out.append(to_batch(new, pad_id, device))
    return out


__all__ = ["TERM_NAMES", "FEATURE_TERMS", "on_policy_step", "rollout", "on_policy_batches", "align", "char_ends",
           "vocab_match", "layer_map", "Projections", "feature_loss"]
