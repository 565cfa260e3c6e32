"""Rendering rows to tokens: the chat template and the tokenizer, each through its fastest exact path.

render_chat / render_pair give (ids, labels) with labels only on the answers. The fast paths (the
Rust tokenizer called directly, the compiled chat template, a conversation's text filled into the
template's render of its roles, the answers' tokens found from character positions) are each checked
against transformers' own result on sample inputs, once per tokenizer or template; where one
differs, transformers' path is used.
"""
from __future__ import annotations

import numpy as np

from stillroom.losses import IGNORE_INDEX

_FAST: dict = {}   # (what, id(tokenizer)[, template]) -> (the tokenizer, its checked fast function)


def once_per(tokenizer, key: tuple, make):
    """make(), made once per tokenizer (and key: what, and e.g. its chat template) and kept: the
    checked fast paths cost sample checks that must not run per row. Kept with the tokenizer
    itself, so a new tokenizer that reuses a dead one's id is not served the dead one's."""
    cached = _FAST.get((*key, id(tokenizer)))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    value = make()
    _FAST[(*key, id(tokenizer))] = (tokenizer, value)
    return value


def _encoder(tokenizer):
    """enc(text) -> (ids, character offsets), as tokenizer(text, add_special_tokens=False,
    return_offsets_mapping=True) gives them; for a fast tokenizer its Rust backend called directly
    (what transformers calls, without the per-call conversion), checked against the reference on
    sample texts once per tokenizer."""
    return once_per(tokenizer, ("encode",), lambda: _make_encoder(tokenizer))


def _make_encoder(tokenizer):
    def slow(t):
        e = tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
        return e["input_ids"], e["offset_mapping"]

    enc = slow
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        def fast(t):
            e = backend.encode(t, add_special_tokens=False)
            return e.ids, e.offsets

        samples = ["Hello, world!", " two  spaces\n\nand lines\t", "accents é, 日本語, emoji 🙂",
                   f"{tokenizer.eos_token or ''}special{tokenizer.bos_token or ''} tokens", ""]
        try:
            if all(tuple(map(list, fast(t))) == (list(slow(t)[0]), [tuple(o) for o in slow(t)[1]]) for t in samples):
                enc = fast
        except Exception:
            pass
    return enc


def encode_head(tokenizer, text: str, limit: int | None) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of `text`, at least its first `limit` tokens exact. A text far longer
    than `limit` tokens is cut to `limit` anyway, so only a prefix is tokenized: one long enough
    that the first limit + 1 tokens agree with those of a prefix twice as long (a 20 MB row costs
    a few kB of work, not a minute). Short texts, and limit None, are tokenized whole."""
    enc = _encoder(tokenizer)

    if limit is not None:
        size = max(4096, 64 * limit)
        while 2 * size < len(text):
            a, b = enc(text[:size]), enc(text[:2 * size])
            n = limit + 1
            if len(a[0]) > n + 8 and a[0][:n] == b[0][:n] and list(a[1][:n]) == list(b[1][:n]):
                return a
            size *= 4
    return enc(text)


def chat_renderer(tokenizer):
    """render(messages, add_generation_prompt) -> the chat template's text, as
    tokenizer.apply_chat_template(..., tokenize=False) gives it. For plain {role, content} messages
    that is the compiled template rendered with the special tokens, which is what transformers
    does after converting the messages; calling the compiled template directly skips that
    conversion (most of a render's time). Checked against apply_chat_template on sample
    conversations once per template: where they differ, apply_chat_template is used."""
    return once_per(tokenizer, ("render", tokenizer.chat_template), lambda: _make_renderer(tokenizer))


def _make_renderer(tokenizer):
    template = tokenizer.chat_template

    def slow(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    render = slow
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled, kw = _compile_jinja_template(template), dict(tokenizer.special_tokens_map)

        def fast(msgs, gen):
            return compiled.render(messages=[dict(m) for m in msgs], tools=None, documents=None,
                                   add_generation_prompt=gen, **kw)

        samples = [[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello!\n"}],
                   [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
        if all(fast(c[:k], g) == slow(c[:k], g) for c in samples for k in range(1, len(c) + 1) for g in (False, True)):
            render = fast
    except Exception:   # a template that needs what only apply_chat_template gives: use it
        pass
    return render


def _verbatim_content(template: str) -> bool:
    """Does the template's text depend on a message's content only by printing it and by whether it
    is empty? True when every use of a content is string concatenation into the output, or a test
    of its truth (`{% if message.content %}`, `is defined`). A template that compares, trims,
    splits or stores it (a reasoning template looking for '</think>', a `| trim`) renders text that
    a placeholder would not show: such templates are rendered row by row."""
    try:
        import jinja2.ext
        from jinja2 import nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        tree = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols]).parse(template)
    except Exception:   # no jinja2, or a template it cannot parse: render row by row
        return False
    through = (nodes.Add, nodes.Concat, nodes.CondExpr, nodes.Not, nodes.And, nodes.Or)
    truth = {"defined", "undefined", "none", "string", "mapping", "sequence", "iterable", "true", "false"}

    def content(n):
        return ((isinstance(n, nodes.Getattr) and n.attr == "content")
                or (isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const) and n.arg.value == "content"))

    def ok(node, up) -> bool:
        if content(node):
            for parent in up:
                if isinstance(parent, (nodes.Output, nodes.If)):   # printed, or the test of an if
                    return True
                if not (isinstance(parent, through) or (isinstance(parent, nodes.Test) and parent.name in truth)):
                    return False
            return False
        return all(ok(child, (node, *up)) for child in node.iter_child_nodes())

    return ok(tree, ())


MARK = "\ue000{}\ue001"   # placeholders of private-use characters: no real content holds them


class _Shapes:
    """A conversation's text by filling its shape: the template rendered once per sequence of
    (role, content empty or not) with placeholders for the non-empty contents (cached), the
    contents put in. Used only for templates whose text depends on contents no other way
    (`_verbatim_content`), checked against rendering on sample conversations once per template."""

    def __init__(self, render):
        self.render, self.cache = render, {}

    def parts(self, msgs, gen: bool) -> list[str] | None:
        """The text around the non-empty contents: parts[0] + c0 + parts[1] + ... + parts[n]; None
        for a shape the template does not print each content of once, in order (seen only past the
        samples: a role they lack): such conversations are rendered."""
        key = (tuple((m["role"], not m["content"]) for m in msgs), gen)
        if key not in self.cache:
            shape = [{"role": m["role"], "content": MARK.format(i) if m["content"] else ""} for i, m in enumerate(msgs)]
            text = self.render(shape, gen)
            got, at = [], 0
            for i, m in enumerate(msgs):
                if m["content"]:
                    j = text.find(MARK.format(i), at)
                    if j < 0 or text.count(MARK.format(i)) != 1:
                        got = None
                        break
                    got.append(text[at:j])
                    at = j + len(MARK.format(i))
            self.cache[key] = None if got is None else got + [text[at:]]
        return self.cache[key]

    def text(self, msgs) -> str | None:
        parts = self.parts(msgs, False)
        if parts is None:
            return None
        out = [parts[0]]
        for c, after in zip((m["content"] for m in msgs if m["content"]), parts[1:]):
            out += (c, after)
        return "".join(out)

    def length(self, msgs, gen: bool) -> int | None:
        """len(render(msgs, gen)) without rendering."""
        parts = self.parts(msgs, gen)
        return None if parts is None else sum(map(len, parts)) + sum(len(m["content"]) for m in msgs)


def _shapes(tokenizer, render):
    """The template's _Shapes, or None (a template that does more with contents than print them,
    or one whose filled shapes differ from its renders on the sample conversations)."""
    return once_per(tokenizer, ("shapes", tokenizer.chat_template), lambda: _make_shapes(tokenizer, render))


def _make_shapes(tokenizer, render):
    shapes = _Shapes(render) if _verbatim_content(tokenizer.chat_template) else None
    samples = [[{"role": "user", "content": "Hi there "}, {"role": "assistant", "content": " Hello!\n"}],
               [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "\na\t"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "  d  "}],
               [{"role": "user", "content": ""}, {"role": "assistant", "content": "{{ x }} {% if %}"}],
               [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]]
    try:
        good = shapes is not None and all(
            shapes.text(c[:k]) == render(c[:k], False) and shapes.length(c[:k], g) == len(render(c[:k], g))
            for c in samples for k in range(1, len(c) + 1) for g in (False, True))
    except Exception:
        good = False
    return shapes if good else None


def _labeller(tokenizer):
    """f(text, spans, limit) -> (ids, labels): the tokens of `text` (encode_head) with labels where a
    token's first character lies in one of the character spans [a, b). For a fast tokenizer the
    span edges are found with the Encoding's char_to_token (no per-token offsets built), checked
    against the offsets on sample texts once per tokenizer."""
    return once_per(tokenizer, ("label",), lambda: _make_labeller(tokenizer))


def _make_labeller(tokenizer):
    def slow(text, spans, limit):
        ids, offsets = encode_head(tokenizer, text, limit)
        starts = np.fromiter((s for s, _e in offsets), dtype=np.int64, count=len(ids))
        mine = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            mine |= (starts >= a) & (starts < b)
        return ids, np.where(mine, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()

    f = slow
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and _encoder(tokenizer).__name__ == "fast":
        def first_at(e, c, n, end):
            """The first token starting at or after character c (n: none)."""
            for k in range(c, min(end, c + 64)):
                t = e.char_to_token(k)
                if t is not None:
                    t = t if e.token_to_chars(t)[0] >= c else t + 1
                    while t > 0 and e.token_to_chars(t - 1)[0] >= c:
                        t -= 1
                    return t
            return n if c + 64 >= end else None

        def fast(text, spans, limit):
            if limit is not None and 2 * max(4096, 64 * limit) < len(text):
                return slow(text, spans, limit)   # a long text: only a prefix is tokenized
            e = backend.encode(text, add_special_tokens=False)
            ids = e.ids
            labels = [IGNORE_INDEX] * len(ids)
            for a, b in spans:
                i, j = first_at(e, a, len(ids), len(text)), first_at(e, b, len(ids), len(text))
                if i is None or j is None:
                    return slow(text, spans, limit)
                labels[i:j] = ids[i:j]
            return ids, labels

        texts = ["Hello, world!", " two  spaces\n\nand lines\t", "accents é, 日本語, emoji 🙂🙂 x",
                 f"{tokenizer.eos_token or ''}special{tokenizer.bos_token or ''} tokens\n"]
        try:
            if all(fast(t, [(a, b)], None) == slow(t, [(a, b)], None)
                   for t in texts for a in range(len(t) + 1) for b in (a, a + 1, a + 3, len(t))):
                f = fast
        except Exception:
            pass
    return f


def render_chat(tokenizer, messages: list[dict], cut: bool = False, limit: int | None = None):
    """Chat template -> (ids, labels) with labels only on assistant turns (end-of-turn included).
    cut: the last answer was cut off (generate's `truncated`): its end-of-turn is not a target,
    so the student never learns to stop where the answer was only cut. limit: only the first
    `limit` tokens are needed exactly (encode_head)."""
    render = chat_renderer(tokenizer)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    shapes = _shapes(tokenizer, render)
    fill = shapes is not None and all(isinstance(m["content"], str) and "\ue000" not in m["content"]
                                      for m in messages)
    # The rendered text and the lengths of prompts and turns: filled into the template's shapes
    # where it allows, else rendered (also where a shape turns out not to fill: None).
    text = shapes.text(messages) if fill else None
    if text is None:
        fill, text = False, render(messages, False)

    def length(msgs, gen):
        got = shapes.length(msgs, gen) if fill else None
        return len(render(msgs, gen)) if got is None else got

    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = length(messages[:i], True)
            end = len(text) if i == len(messages) - 1 else length(messages[:i + 1], False)
            if cut and i == last:
                at = text.find(m["content"], start, end)
                end = at + len(m["content"]) if at >= 0 and m["content"] else end
            spans.append((start, end))
    return _labeller(tokenizer)(text, spans, limit)


def render_pair(tokenizer, prompt: str, response: str, cut: bool = False, limit: int | None = None):
    if tokenizer.chat_template:
        return render_chat(tokenizer, [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": response}], cut, limit)
    p = encode_head(tokenizer, prompt + "\n", limit)[0]
    r = encode_head(tokenizer, response, limit)[0] + ([] if cut else [tokenizer.eos_token_id])
    return p + r, [IGNORE_INDEX] * len(p) + r
