"""A served teacher that scores text: the teacher runs in an inference server (vLLM, llama.cpp's
server, anything OpenAI-compatible), not in training memory.

    teacher: {kind: served, model: smollm2-135m, served: {url: http://127.0.0.1:8000/v1, top_k: 20}}

For every example, one request to the server's `/v1/completions` returns the teacher's top-k
log-probs at every position of the example's own tokens; those become the same top-k targets a
`stillroom cache` holds (ids, log-probs, the log of the mass outside them, and the log-prob of the
true next token), so the loss, the evaluation and `stillroom cache` read them unchanged. Two shapes
of request, as servers give them (`teacher.served.api`):

- `prompt_logprobs` (vLLM): the token ids as the prompt, `max_tokens: 1`, `prompt_logprobs: k`. Entry
  i of the answer is the distribution of token i given the tokens before it (entry 0 is null): k
  entries ranked 1..k, plus the realized token when it is outside them. k above 20 needs the
  server started with `--max-logprobs`.
- `echo` (the legacy completions API; llama.cpp's server with logits_all): the text as the prompt,
  `echo: true, logprobs: k`. The server tokenizes the text itself and names tokens by their text:
  its tokens must spell exactly the example's, else the request is refused in one line; a listed
  token whose text no single id has goes to the tail.

`teacher.model` names the teacher's tokenizer and config (a folder, a .gguf, a hub id or
`smollm2-135m`); its weights are read only to cut a student from them. The server must tokenize
as that tokenizer does: a probe is checked before anything trains. The loss's temperature must be
1 (a server's log-probs are at T = 1, and the tail at another T cannot be known from the top-k).

Requests go through the official `openai` client (retries with exponential backoff on connection
errors, 408/409/429 and 5xx, honouring Retry-After), `concurrency` at a time. A request that still
fails stops the run with one line; the run's last checkpoint is kept and `--resume` continues.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from stillroom.errors import UserError

log = logging.getLogger("stillroom")

PROBE = "The quick brown fox jumps over the lazy dog. 1234 + 5678 = 6912; naïve café, 東京."


def prompt_logprobs_entries(raw, n: int, fail) -> list[dict | None]:
    """vLLM's `prompt_logprobs` for n prompt tokens -> per token {id: log-prob}, by rank (the
    realized token, listed past the top-k with its own rank, last); None for token 0. fail(what)
    makes the exception for a list that cannot be read."""
    if not isinstance(raw, list) or len(raw) < n:
        raise fail("no prompt_logprobs" if raw is None else
                   f"prompt_logprobs for {len(raw) if isinstance(raw, list) else 0} of {n} prompt tokens")
    out = [None]
    for i in range(1, n):
        entry = raw[i]
        if entry is None or entry == {}:   # nothing there (a position without a loss, in an export): an
            out.append({})                 # error only where a target is read (target_rows)
            continue
        if not isinstance(entry, dict):
            raise fail(f"a prompt_logprobs entry it cannot read at token {i}")
        ranked = []
        try:
            for tid, v in entry.items():
                v = v if isinstance(v, dict) else {"logprob": v}
                ranked.append((v.get("rank") or 0, int(tid), float(v["logprob"])))
        except (KeyError, TypeError, ValueError):
            raise fail(f"a prompt_logprobs entry it cannot read at token {i}") from None
        ranked.sort(key=lambda x: (x[0] or math.inf, -x[2]))   # by rank; the realized token's is past k
        out.append({tid: lp for _, tid, lp in ranked})
    return out


def target_rows(e, raw, k: int, fail):
    """A cache's four rows for example e (over cache.positions(e)) from per-token entries
    {id: log-prob} (entry i: the distribution of token i): the first k listed ids and their
    log-probs, the log of the mass outside them, and the true token's log-prob (exact where listed,
    else the tail's log-mass, an upper bound)."""
    from stillroom.teachers.cache import positions

    pos = positions(e)
    ids = torch.zeros(len(pos), k, dtype=torch.long)
    logp = torch.full((len(pos), k), float("-inf"))
    tail = torch.full((len(pos),), float("-inf"))
    label_logp = torch.zeros(len(pos))
    for r, p in enumerate(pos):
        entry, true = raw[p + 1], e.labels[p + 1]
        listed = [(t, v) for t, v in entry.items() if not math.isnan(v)][:k]
        if not listed:
            raise fail(f"no finite log-prob at position {p + 1}")
        used = {t for t, _ in listed}
        spare = [t for t in range(k + len(used)) if t not in used][:k - len(listed)]
        ids[r] = torch.tensor([t for t, _ in listed] + spare)
        logp[r, :len(listed)] = torch.tensor([v for _, v in listed])
        mass = math.fsum(math.exp(v) for _, v in listed)
        tail[r] = math.log1p(-mass) if mass < 1 - 1e-6 else float("-inf")
        label_logp[r] = entry.get(true, tail[r].item() if mass < 1 - 1e-6 else math.log(1e-12))
    return ids, logp, tail, label_logp


class ServedScorer:
    """The read side of a served teacher, shaped like a cache.TeacherCache: `rows(e)` for one
    example, `many(examples)` for several at once, `targets(examples, seq_len, device)` for a batch."""

    def __init__(self, scfg, tok, name: str):
        try:
            import openai
        except ImportError:
            raise UserError("teacher.kind=served needs the openai client: pip install 'stillroom[api]'") from None
        self.openai, self.scfg, self.tok, self.name = openai, scfg, tok, name
        self.url, self.model = scfg.url, scfg.model or name
        self.top_k = scfg.top_k
        self.client = openai.OpenAI(base_url=scfg.url, api_key=os.environ.get(scfg.api_key_env) or "none",
                                    max_retries=scfg.retries, timeout=scfg.timeout)
        self.api = scfg.api
        self._probed, self._probe_max = None, 0   # the probe scored (its ids) and its largest listed id
        self._pieces, self.echo_shift, self.last_status = None, None, None
        self._pool = ThreadPoolExecutor(max(1, scfg.concurrency), thread_name_prefix="served")
        self.temperature = 1.0   # a server's log-probs (what the evaluation asks of a cache)

    # -------------------------------------------------------------------------- requests

    def _call(self, **kw):
        try:
            return self.client.completions.create(model=self.model, **kw)
        except self.openai.APIConnectionError as e:
            raise UserError(f"cannot reach the served teacher at {self.url} ({e.__class__.__name__}) after "
                            f"{self.scfg.retries} retries; start the server (or fix teacher.served.url) and run "
                            "again (--resume continues a run from its last checkpoint)") from None
        except self.openai.APIStatusError as e:
            self.last_status = e.status_code
            hint = (" (vLLM caps prompt_logprobs at its --max-logprobs, 20 by default: lower "
                    "teacher.served.top_k or restart the server with --max-logprobs)"
                    if e.status_code == 400 and "logprob" in str(e.message).lower() else "")
            raise UserError(f"the served teacher at {self.url} answered {e.status_code}"
                            f"{f' after {self.scfg.retries} retries' if e.status_code >= 500 else ''}: "
                            f"{str(e.message)[:200]}{hint}") from None

    def _raw(self, ids: list[int]) -> list[dict | None]:
        """Per token of `ids`: {id: log-prob} of the teacher's top-k at that token (given the
        tokens before it), with the realized token's entry added; None for token 0."""
        if self.api == "prompt_logprobs":
            r = self._call(prompt=ids, max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": self.top_k})
            return self._from_prompt_logprobs(r, ids)
        r = self._call(prompt=self.tok.decode(ids, clean_up_tokenization_spaces=False), max_tokens=1,
                       temperature=0.0, echo=True, logprobs=self.top_k)
        return self._from_echo(r, ids)

    def _malformed(self, what: str):
        return UserError(f"the served teacher at {self.url} returned {what}: is teacher.served.api "
                         f"({self.api}) the shape this server speaks?")

    def _from_prompt_logprobs(self, r, ids):
        choice = r.choices[0] if getattr(r, "choices", None) else None
        raw = getattr(choice, "prompt_logprobs", None)
        if raw is None and choice is not None:
            raw = (choice.model_extra or {}).get("prompt_logprobs")
        if raw is None:
            raw = (getattr(r, "model_extra", None) or {}).get("prompt_logprobs")
        return prompt_logprobs_entries(raw, len(ids), self._malformed)

    def _from_echo(self, r, ids):
        choice = r.choices[0] if getattr(r, "choices", None) else None
        lp = getattr(choice, "logprobs", None)
        tokens = getattr(lp, "tokens", None)
        tops, own = getattr(lp, "top_logprobs", None), getattr(lp, "token_logprobs", None)
        if not tokens or tops is None or own is None:
            raise self._malformed("no echoed logprobs (llama.cpp's server needs logits_all)")
        if self._pieces is None:
            from stillroom.teachers.api import _pieces
            self._pieces = _pieces(self.tok)
        mine = [self.tok.decode([t], clean_up_tokenization_spaces=False) for t in ids]

        def same(a, b):   # a piece of a multi-byte character decodes to U+FFFD here, to its bytes there
            return a == b or ("\ufffd" in b and len(a) <= 4)

        def match(s):
            return len(tokens) >= s + len(mine) and all(same(a, b) for a, b in zip(tokens[s:], mine))

        start = next((s for s in range(0, 2) if match(s)), None)   # 1: a BOS the server added
        if start is None:
            i = next((i for i, (a, b) in enumerate(zip(tokens, mine)) if not same(a, b)), min(len(tokens), len(mine)))
            raise UserError(f"the served teacher at {self.url} tokenizes the text differently from "
                            f"{self.name}'s tokenizer (token {i}: {tokens[i:i + 3]!r} there, {mine[i:i + 3]!r} "
                            "here): serve the same model, or set teacher.model to the served model's tokenizer")
        rows = [None] + [self._by_id(tops[j]) for j in range(start + 1, len(tokens))]
        if self.echo_shift is None:   # decided once, on the probe
            self.echo_shift = self._shifted(rows, ids)
        out = [None]
        if self.echo_shift:   # entry i is the distribution of token i + 1: entry 0's is asked for apart
            first = self._call(prompt=self.tok.decode(ids[:1], clean_up_tokenization_spaces=False), max_tokens=1,
                               temperature=0.0, logprobs=self.top_k)
            lp = getattr(first.choices[0], "logprobs", None) if getattr(first, "choices", None) else None
            out.append(self._by_id((getattr(lp, "top_logprobs", None) or [None])[-1]))
            out += rows[1:len(ids) - 1]
            return out
        for i in range(1, len(ids)):
            row = dict(rows[i])
            j = start + i
            if own[j] is not None and math.isfinite(own[j]):
                row.setdefault(ids[i], float(own[j]))
            out.append(row)
        return out

    def _by_id(self, top: dict | None) -> dict:
        """An echoed {token text: log-prob} as {id: log-prob}, most likely first, at most top_k: a
        text that no single id has is left out (its mass goes to the tail)."""
        row = {self._pieces[t]: float(v) for t, v in (top or {}).items()
               if t in self._pieces and v is not None and math.isfinite(v)}
        return dict(sorted(row.items(), key=lambda x: -x[1])[:self.top_k])

    @staticmethod
    def _shifted(rows, ids) -> bool:
        """Whether the echoed entry i holds the distribution of token i + 1, not of token i
        (llama-cpp-python's server does so): its top token is then the next token far more often."""
        own = sum(bool(rows[i]) and next(iter(rows[i])) == ids[i] for i in range(1, len(ids)))
        nxt = sum(bool(rows[i]) and next(iter(rows[i])) == ids[i + 1] for i in range(1, len(ids) - 1))
        if nxt > own:
            log.info("the server's echoed log-probs are one token late (entry i is the distribution of token "
                     "i + 1, as llama-cpp-python's server gives them): read so, with one more request per "
                     "example for the first token")
        return nxt > own

    # -------------------------------------------------------------------------- targets

    def _rows_of(self, e, raw):
        return target_rows(e, raw, self.top_k, self._malformed)

    def _one(self, e):
        return self._rows_of(e, self._raw(list(e.input_ids)))

    def many(self, examples) -> list[tuple]:
        """The rows of each example, `concurrency` requests in flight."""
        return list(self._pool.map(self._one, examples))

    def rows(self, e):
        return self.many([e])[0]

    def targets(self, examples, seq_len: int, device):
        from stillroom.teachers.cache import batch_targets, positions

        todo = [e for e in examples if positions(e)]
        got = iter(self.many(todo))
        return batch_targets(examples, [next(got) if positions(e) else None for e in examples], seq_len,
                             self.top_k, device)

    # -------------------------------------------------------------------------- checks

    def check(self, s_tok, vocab: int | None = None):
        """Before anything trains: the server answers in the configured shape (`auto`: the first
        that does), tokenizes a probe as the student's tokenizer does, and its ids fit the student.
        A probe of the same ids already scored is not sent again (a run checks early and again)."""
        ids = s_tok(PROBE, add_special_tokens=False)["input_ids"]
        if ids == self._probed:
            return self._fits(self._probe_max, vocab)
        if self.api == "auto":
            self.api, client = "prompt_logprobs", self.client
            self.client = client.with_options(max_retries=0)   # a server that cannot take ids says so at once
            self.last_status = None
            try:
                raw = self._raw(ids)
            except UserError as e:
                self.client = client
                if self.last_status in (None, 408, 409, 429, 502, 503, 504):   # unreachable or busy: not the shape
                    raw = self._raw(ids)                                        # (with the retries it is given)
                else:   # refused (vLLM's shape unknown there: llama-cpp-python answers 500, others 400/422)
                    log.info("served teacher at %s: no prompt_logprobs (%s); trying echo + logprobs", self.url,
                             str(e)[:160])
                    self.api = "echo"
                    raw = self._raw(ids)
            self.client = client
        else:
            raw = self._raw(ids)
        top = max((t for entry in raw[1:] for t in entry), default=0)
        self._fits(top, vocab)
        if self.api == "prompt_logprobs":   # ids go out as they are: the server must read them as we do
            theirs = self._tokenize(PROBE)
            if theirs is None:
                log.warning("served teacher at %s: it has no /tokenize endpoint, so its tokenizer cannot be "
                            "checked against %s's; the ids sent are read as its own", self.url, self.name)
            elif theirs != ids:
                raise UserError(f"the served teacher at {self.url} tokenizes text differently from {self.name}'s "
                                f"tokenizer (a probe: {theirs[:8]}... there, {ids[:8]}... here): serve the same "
                                "model, or set teacher.model to the served model's tokenizer")
        log.info("served teacher %s at %s: probe scored (%d tokens, top-%d per position, %s)", self.model,
                 self.url, len(ids), self.top_k, self.api)
        self._probed, self._probe_max = ids, top

    def _fits(self, top: int, vocab: int | None):
        if vocab is not None and top >= vocab:
            raise UserError(f"the served teacher at {self.url} returned token id {top}, outside the "
                            f"student's vocabulary ({vocab}): it is not the same tokenizer")

    def _tokenize(self, text: str) -> list[int] | None:
        """The server's tokens for `text` from its /tokenize endpoint (vLLM's and llama.cpp's), or
        None where it has none."""
        import httpx

        root = self.url.rstrip("/").removesuffix("/v1")
        try:
            r = httpx.post(root + "/tokenize", json={"model": self.model, "prompt": text, "content": text,
                                                    "add_special_tokens": False}, timeout=self.scfg.timeout,
                           headers={"Authorization": f"Bearer {os.environ.get(self.scfg.api_key_env) or 'none'}"})
            tokens = r.json().get("tokens") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return [int(t) for t in tokens] if isinstance(tokens, list) and all(
            isinstance(t, int) for t in tokens) else None

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------ served vs local

@torch.no_grad()
def check_against_local(scfg, teacher: str, data: str, rows: int = 16, seq_len: int = 256,
                        progress: bool = True) -> dict:
    """`stillroom served-check`: the served teacher and the same model loaded here score the same
    held-out rows; -> per-position top-1 agreement, KL(served || local) over the served top-k + one
    tail bucket (the loss's own comparison), the largest log-prob difference of a listed token and
    where, the true token's log-prob difference where listed, and the rows the server could not
    score as the local tokenizer reads them (tokenized otherwise)."""
    from tqdm.auto import tqdm

    from stillroom.config import DataConfig
    from stillroom.data.examples import build_examples
    from stillroom.models import core as models
    from stillroom.teachers.cache import positions

    local = models.load(teacher, dtype=torch.float32)
    tok = local.tokenizer
    scorer = ServedScorer(scfg, tok, teacher)   # scfg: a config.ServedConfig (teacher.served's keys)
    scorer.width = models.logits_width(local.model)
    try:
        scorer.check(tok, scorer.width)
        examples, _ = build_examples(data, tok, DataConfig(seq_len=seq_len))
        examples = [e for e in examples if positions(e)][:rows]
        if not examples:
            raise UserError(f"{data} has no rows with a position to score (seq_len {seq_len})")
        n = agree = 0
        kl, label_diff, worst, kl_worst, refused = [], [], (-1.0, None), (-1.0, None), []
        for r, e in enumerate(tqdm(examples, desc="served vs local", unit="row", disable=not progress)):
            try:
                ids, logp, tail, label = scorer.rows(e)
            except UserError as err:   # this row tokenized otherwise there, say
                refused.append((r, str(err)))
                continue
            pos = torch.tensor(positions(e))
            L = torch.log_softmax(local.model(input_ids=torch.tensor([e.input_ids])).logits[0, pos].float(), -1)
            listed = torch.isfinite(logp)
            q = L.gather(-1, ids)                                   # local log-probs of the served ids
            agree += int((ids[:, 0] == L.argmax(-1)).sum())
            n += len(pos)
            p_tail, q_tail = tail.exp(), (1 - q.exp().masked_fill(~listed, 0).sum(-1)).clamp_min(1e-12)
            row_kl = (logp.exp() * (logp - q)).masked_fill(~listed, 0).sum(-1) + torch.where(
                p_tail > 0, p_tail * (tail - q_tail.log()), torch.zeros_like(p_tail))
            kl.append(row_kl)
            d = (logp - q).abs().masked_fill(~listed, 0)
            at = int(d.max(-1).values.argmax())
            if float(d[at].max()) > worst[0]:
                j = int(d[at].argmax())
                worst = (float(d[at, j]), (r, int(pos[at]) + 1, tok.decode([int(ids[at, j])])))
            if float(row_kl.max()) > kl_worst[0]:
                kl_worst = (float(row_kl.max()), (r, int(pos[int(row_kl.argmax())]) + 1))
            true = torch.tensor(e.labels)[pos + 1]
            exact = (ids == true[:, None]) & listed
            label_diff.append((label - L.gather(-1, true[:, None]).squeeze(-1))[exact.any(-1)].abs())
    finally:
        scorer.close()
    kl_all = torch.cat(kl) if kl else torch.zeros(0)
    diffs = torch.cat(label_diff) if label_diff else torch.zeros(0)
    return {"url": scfg.url, "served_model": scorer.model, "teacher": teacher, "api": scorer.api, "top_k": scfg.top_k,
            "rows": len(examples), "positions": n, "top1_agreement": agree / n if n else None,
            "kl_per_position": float(kl_all.mean()) if n else None,
            "kl_max": {"value": kl_worst[0], "row": kl_worst[1][0], "position": kl_worst[1][1]} if kl_worst[1] else None,
            "max_logprob_diff": ({"value": worst[0], "row": worst[1][0], "position": worst[1][1], "token": worst[1][2]}
                                 if worst[1] else None),
            "true_token_logprob_diff": float(diffs.mean()) if len(diffs) else None,
            "true_token_listed": len(diffs), "rows_tokenized_otherwise": [{"row": r, "why": w} for r, w in refused]}


def check_table(got: dict) -> str:
    """The served-check report as a person reads it."""
    def num(v, f):
        return "-" if v is None else f.format(v)
    lines = [f"served teacher {got['served_model']} at {got['url']} ({got['api']}, top-{got['top_k']}) vs "
             f"{got['teacher']} loaded here: {got['rows']} rows, {got['positions']:,} positions",
             f"  top-1 agreement                       {num(got['top1_agreement'], '{:.4f}')}",
             f"  KL(served || local), top-k + tail     {num(got['kl_per_position'], '{:.5f}')} nats/position"]
    if got["kl_max"]:
        k = got["kl_max"]
        lines.append(f"    largest                             {k['value']:.4f} (row {k['row']}, token {k['position']})")
    if got["max_logprob_diff"]:
        w = got["max_logprob_diff"]
        lines.append(f"  largest |log-prob difference|         {w['value']:.4f} (row {w['row']}, token {w['position']}, "
                     f"{w['token']!r})")
    lines.append(f"  the true token's |log-prob diff|      {num(got['true_token_logprob_diff'], '{:.4f}')} on average "
                 f"({got['true_token_listed']:,} positions where the server listed it)")
    bad = got["rows_tokenized_otherwise"]
    lines.append(f"  rows the server read otherwise        {len(bad)}")
    lines += [f"    row {b['row']}: {b['why']}" for b in bad[:3]]
    same = (not bad and got["top1_agreement"] is not None and got["top1_agreement"] >= 0.9
            and got["kl_per_position"] < 0.05)
    lines.append("verdict: " + ("the same model within numeric tolerance" if same else
                                "they differ: check the served model, its tokenizer, chat template and dtype"))
    return "\n".join(lines)


__all__ = ["ServedScorer", "PROBE", "check_against_local", "check_table"]
