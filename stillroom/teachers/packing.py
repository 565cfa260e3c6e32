"""How a cache shard stores its rows: plain tensors (`cache.dtype=float16|float32`) or packed
(`cache.dtype=packed`), the layout that costs fewer bytes a position than DistillKit's default
at a better reconstruction (docs/results.md#captures).

A packed row (one position's top-k) holds:
    ids         sorted, as the gaps between them (the first id, then id_i - id_{i-1} - 1), in
                Exp-Golomb codes of order `order` (a gap g: w = g + 2^order written as z zeros
                and the last z + order bits of w, z = bit length of w - 1 - order). The codes of
                a sample's rows are one bit stream per sample: first every code's prefix (z zeros
                and a one, so the prefixes end at the first n ones), then every code's bits. Both
                parts decode as whole arrays, no per-code loop. About 9 bits an id at k = 160 over a
                49k vocabulary, where a uint16 takes 16.
    log-probs   in the ids' order, BITS bits each: 0 is "no entry" (-inf); the row's most likely
                entry alone gets the top code, which reads back as the row's maximum `hi`; the
                others are rounded to codes 1 .. top - 1 on an even grid from the row's minimum
                `lo` up to one step below `hi` (so the top-1 token is never tied or lost).
                lo and hi are float16, rounded outwards.
    tail, the true token's log-prob     float16.
Reading gives the entries highest first, as the other layouts and the teacher's top-k do, with
the log-probs as float32.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BITS = 6
TOP = 2 ** BITS - 1
PLAIN = {"float16": torch.float16, "float32": torch.float32}


def order(vocab: int, k: int) -> int:
    """The Exp-Golomb order for k ids out of vocab: the mean gap is about vocab / k, and the gaps
    of a top-k (dense among frequent tokens, long between rare ones) cost least about 2 bits
    under it (measured on the bundled teacher: 9.0 bits an id at k = 160)."""
    return max(0, int(math.floor(math.log2(max(vocab / k, 1)))) - 2)


class Layout:
    """The tensors of a shard for `dtype` (float16, float32 or packed), k entries a row."""

    def __init__(self, dtype: str, vocab: int, k: int):
        self.dtype, self.vocab, self.k = dtype, vocab, k
        self.packed = dtype == "packed"
        self.order = order(vocab, k)
        self.per_row = ("q", "range", "tail", "label_logp") if self.packed else ("ids", "logp", "tail", "label_logp")
        self.names = ("code", "code_bytes", *self.per_row) if self.packed else self.per_row   # (a sample's ids
        # bit streams, and their lengths: one entry a sample)

    @classmethod
    def of(cls, index: dict) -> "Layout":
        return cls(index["dtype"], index["vocab_size"], index["top_k"])

    def encode(self, ids, logp, tail, label_logp) -> dict[str, torch.Tensor]:
        """One sample's rows (R, k) ids and log-probs, (R,) tail and true-token log-probs (any
        dtype, on the host) -> its tensors, one per name (each concatenates along dim 0 with the
        shard's other samples)."""
        if not self.packed:
            ids_dtype = torch.uint16 if self.vocab <= 2 ** 16 else torch.int32
            return {"ids": ids.to(ids_dtype), "logp": logp.to(PLAIN[self.dtype]), "tail": tail.float(),
                    "label_logp": label_logp.float()}
        ids, logp = ids.long().numpy(), logp.double().numpy()
        rows = np.arange(len(ids))[:, None]
        by_id = np.argsort(ids, axis=1, kind="stable")
        ids, logp = ids[rows, by_id], logp[rows, by_id]
        gaps = np.diff(ids, axis=1, prepend=-1) - 1
        code = _eg_encode(gaps.ravel(), self.order)
        q, rng = _quantize(logp)
        return {"code": torch.from_numpy(code), "code_bytes": torch.tensor([len(code)], dtype=torch.int64),
                "q": torch.from_numpy(_pack(q, BITS)), "range": torch.from_numpy(rng.astype(np.float16)),
                "tail": tail.half(), "label_logp": label_logp.half()}

    def decode(self, t: dict[str, torch.Tensor]):
        """A sample's tensors (its rows; `code`: its bytes) -> (ids (R, k) int64, log-probs (R, k)
        float32, tail (R,), true-token log-probs (R,)), highest log-prob first."""
        if not self.packed:
            return t["ids"], t["logp"], t["tail"], t["label_logp"]
        R, k = t["q"].shape[0], self.k
        gaps = _eg_decode(t["code"].numpy(), R * k, self.order).reshape(R, k)
        ids = np.cumsum(gaps + 1, axis=1) - 1
        q = _unpack(t["q"].numpy(), BITS, k)
        by_value = np.argsort(-q, axis=1, kind="stable")   # the codes order the values (one row, one grid)
        q, ids = np.take_along_axis(q, by_value, 1), np.take_along_axis(ids, by_value, 1)
        logp = _dequantize(q, t["range"].numpy().astype(np.float64)).astype(np.float32)
        return torch.from_numpy(ids), torch.from_numpy(logp), t["tail"].float(), t["label_logp"].float()


# ------------------------------------------------------------------ log-probs on a grid per row

def _quantize(logp: np.ndarray):
    """(R, k) float64 (-inf: no entry) -> codes (R, k) in 0..TOP, and (R, 2) [lo, hi] float16-exact."""
    finite = np.isfinite(logp)
    big = np.where(finite, logp, -np.inf).max(1)
    small = np.where(finite, logp, np.inf).min(1)
    none = ~finite.any(1)
    big, small = np.where(none, 0.0, big), np.where(none, 0.0, small)
    hi = _f16(big, up=True)
    lo = np.minimum(_f16(small, up=False), hi)
    step = (hi - lo) / (TOP - 1)                      # codes 1 .. TOP-1 span lo .. hi - step
    safe = np.where(step > 0, step, 1.0)
    q = np.clip(np.rint((logp - lo[:, None]) / safe[:, None]) + 1, 1, TOP - 1)
    q = np.where(finite, q, 0).astype(np.uint8)
    top = np.where(finite, logp, -np.inf).argmax(1)
    q[np.arange(len(q))[~none], top[~none]] = TOP
    return q, np.stack([lo, hi], 1)


def _dequantize(q: np.ndarray, rng: np.ndarray) -> np.ndarray:
    lo, hi = rng[:, :1], rng[:, 1:]
    step = (hi - lo) / (TOP - 1)
    v = lo + (q.astype(np.float64) - 1) * step
    return np.where(q == 0, -np.inf, np.where(q == TOP, hi, v))


def _f16(x: np.ndarray, up: bool) -> np.ndarray:
    """x rounded to float16 towards +inf (up) or -inf, as float64."""
    h = x.astype(np.float16)
    wrong = (h.astype(np.float64) < x) if up else (h.astype(np.float64) > x)
    h = np.where(wrong, np.nextafter(h, np.float16(np.inf if up else -np.inf)), h)
    return h.astype(np.float64)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(R, k) codes of `bits` bits -> (R, ceil(k * bits / 8)) uint8, most significant bit first."""
    b = (q[..., None] >> np.arange(bits - 1, -1, -1, dtype=np.uint8)) & 1
    return np.packbits(b.reshape(len(q), -1).astype(np.uint8), axis=1)


def _unpack(p: np.ndarray, bits: int, k: int) -> np.ndarray:
    b = np.unpackbits(p, axis=1)[:, :k * bits].reshape(len(p), k, bits).astype(np.int64)
    return (b << np.arange(bits - 1, -1, -1)).sum(-1)


# ------------------------------------------------------------------ Exp-Golomb, whole arrays

def _eg_encode(v: np.ndarray, r: int) -> np.ndarray:
    """Non-negative ints -> bytes: every prefix (z zeros, then a one), then every code's low
    z + r bits, most significant first; zero-padded to a byte."""
    w = v.astype(np.int64) + (1 << r)
    n = np.frexp(w.astype(np.float64))[1].astype(np.int64)   # bit length of w (exact below 2^53)
    z, width = n - 1 - r, n - 1
    prefix = np.zeros(int((z + 1).sum()), dtype=np.uint8)
    prefix[np.cumsum(z + 1) - 1] = 1
    body = _bits(w, width)
    return np.packbits(np.concatenate([prefix, body]))


def _bits(w: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The low `width` bits of each w, most significant first, concatenated."""
    total = int(width.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint8)
    owner = np.repeat(np.arange(len(w)), width)
    start = np.cumsum(width) - width
    shift = width[owner] - 1 - (np.arange(total) - start[owner])
    return ((w[owner] >> shift) & 1).astype(np.uint8)


def _eg_decode(code: np.ndarray, n: int, r: int) -> np.ndarray:
    """The first n values of an _eg_encode stream."""
    bits = np.unpackbits(code)
    ends = np.flatnonzero(bits)[:n]
    if len(ends) < n:
        raise ValueError("packed ids: the stream ends early")
    z = np.diff(ends, prepend=-1) - 1
    width = z + r
    start = ends[-1] + 1 + np.cumsum(width) - width
    if len(width) and start[-1] + width[-1] > len(bits):
        raise ValueError("packed ids: the stream ends early")
    w = np.empty(n, dtype=np.int64)
    for size in np.unique(width):                            # the codes of one width at a time
        sel = np.flatnonzero(width == size)
        body = bits[start[sel, None] + np.arange(size)].astype(np.int64) @ (1 << np.arange(size - 1, -1, -1))
        w[sel] = (1 << size) | body                          # the leading one of w, then its bits
    return w - (1 << r)
