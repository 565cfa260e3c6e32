"""DistillKit's (and open-instruct's) compressed logit captures, read and written.

A capture is a folder of `data_{i}.parquet` files and a `compression_config.yaml`. Each parquet row
is one sequence: `input_ids` (list of uint64), and per position a byte row in `compressed_logprobs`
and one in `bytepacked_indices` (open-instruct adds `messages` and `text` strings, ignored here).
Row j holds the teacher's top-k for token j + 1 (vLLM's prompt log-probs less its empty entry 0);
a sequence of L tokens has L - 1 rows, or L when entry 0 was kept (then row 0 is empty and row j
is token j's). Each row's k entries are sorted by log-prob, highest first; slots past what the
teacher listed hold -inf.

`bytepacked_indices`: the k token ids, ceil(log2 d) bits each, most significant bit first, packed
into bytes (the last one zero-padded).

`compressed_logprobs`, the config's `d, k, exact_k, exact_dtype, polynomial_terms, term_dtype,
residual_bins, delta_encoding, normalize_t` (little-endian values, each part byte-aligned):
  1. exact_k log-probs in exact_dtype;
  2. one coefficient per polynomial term (term_dtype) of a least-squares fit to the other k -
     exact_k values at t = 0, 1, ... (or k - exact_k points spread over [0, 1] with normalize_t):
     an int term n is t**n, "sqrt" and "exp" are those of t;
  3. per residual bin: a scale (its scale_dtype), then num_elements quantized residuals (value -
     fit) of element_bits each, packed as the ids are: a stored q stands for (q - 2**(bits-1)) *
     scale (for 1 bit, (2q - 1) * scale); residuals past the bins are 0.
With delta_encoding the values are the first log-prob and then successive differences (summed
back on reading). This is the format as DistillKit's and open-instruct's `compression` modules
write it; the code here is stillroom's own.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stillroom.errors import UserError

CONFIG = "compression_config.yaml"
WIDTH = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def read_config(folder: Path) -> dict:
    """compression_config.yaml in `folder` (or the file itself), checked (its legacy
    `legacy_logit_compression` form is refused)."""
    import yaml

    path = Path(folder) if Path(folder).is_file() else Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"{folder} has no {CONFIG}: a DistillKit capture is a folder of data_*.parquet files "
                        f"and their {CONFIG}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    cfg = cfg.get("logprob_compressor", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict) or "legacy_logit_compression" in cfg or "polynomial_degree" in cfg:
        raise UserError(f"{path}: DistillKit's legacy logit compression is not read; recapture with its "
                        "distribution quantization (d, k, exact_k, ...)")
    need = ("d", "k", "exact_k")
    if any(not isinstance(cfg.get(key), int) or cfg[key] < 0 for key in need) or cfg["k"] < 1:
        raise UserError(f"{path}: needs integers d, k and exact_k (found {({key: cfg.get(key) for key in need})})")
    cfg = {"exact_dtype": "float32", "polynomial_terms": None, "term_dtype": "float32", "residual_bins": [],
           "delta_encoding": True, "error_diffusion": False, "normalize_t": False, **cfg}
    for key in ("exact_dtype", "term_dtype"):
        if cfg[key] not in WIDTH:
            raise UserError(f"{path}: {key}={cfg[key]!r}: one of {', '.join(WIDTH)}")
    for b in cfg["residual_bins"] or []:
        if b.get("scale_dtype") not in WIDTH or not 1 <= int(b.get("element_bits", 0)) <= 64 \
                or int(b.get("num_elements", 0)) < 1:
            raise UserError(f"{path}: a residual bin it cannot read: {b}")
    for t in cfg["polynomial_terms"] or []:
        if not (isinstance(t, int) or t in ("sqrt", "exp")):
            raise UserError(f"{path}: polynomial term {t!r}: an integer power, sqrt or exp")
    if cfg["exact_k"] > cfg["k"] or sum(b["num_elements"] for b in cfg["residual_bins"] or []) > cfg["k"] - cfg["exact_k"]:
        raise UserError(f"{path}: exact_k and the residual bins hold more than k = {cfg['k']} values")
    return cfg


def index_bits(d: int) -> int:
    return max(1, math.ceil(math.log2(d)))


def unpack(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """(R, B) uint8 -> (R, n) int64: n values of `bits` bits each, most significant first."""
    flat = np.unpackbits(data, axis=-1, bitorder="big")[:, :n * bits].reshape(data.shape[0], n, bits)
    out = np.zeros((data.shape[0], n), dtype=np.uint64)
    for b in range(bits):
        out = (out << np.uint64(1)) | flat[:, :, b].astype(np.uint64)
    return out.astype(np.int64)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(R, n) non-negative ints -> (R, ceil(n * bits / 8)) uint8, most significant bit first."""
    v = values.astype(np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    flat = ((v[:, :, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(v.shape[0], -1)
    return np.packbits(flat, axis=-1, bitorder="big")


def _floats(data: np.ndarray, dtype: str, n: int) -> np.ndarray:
    """(R, n * width) uint8 little-endian -> (R, n) float64."""
    raw = np.ascontiguousarray(data)
    if dtype == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(-1, n)
    return raw.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]).astype(np.float64).reshape(-1, n)


def _terms(terms: list, n: int, normalize_t: bool) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n) if normalize_t else np.arange(n, dtype=np.float64)
    return np.stack([t ** p if isinstance(p, int) else getattr(np, p)(t) for p in terms], axis=-1)


def decode_logprobs(data: np.ndarray, cfg: dict) -> np.ndarray:
    """(R, B) uint8 compressed rows -> (R, k) float64 log-probs (the format in the module's text)."""
    k, exact = cfg["k"], cfg["exact_k"]
    at, parts = 0, []

    def take(nbytes):
        nonlocal at
        if at + nbytes > data.shape[1]:
            raise UserError(f"a compressed_logprobs row of {data.shape[1]} bytes is shorter than "
                            f"{CONFIG} describes")
        at += nbytes
        return data[:, at - nbytes:at]

    parts.append(_floats(take(exact * WIDTH[cfg["exact_dtype"]]), cfg["exact_dtype"], exact) if exact
                 else np.zeros((data.shape[0], 0)))
    terms = cfg["polynomial_terms"] or []
    coeffs = _floats(take(len(terms) * WIDTH[cfg["term_dtype"]]), cfg["term_dtype"], len(terms)) if terms else None
    residual = np.zeros((data.shape[0], k - exact))
    i = 0
    for b in cfg["residual_bins"] or []:
        scale = _floats(take(WIDTH[b["scale_dtype"]]), b["scale_dtype"], 1)
        bits, m = int(b["element_bits"]), int(b["num_elements"])
        q = unpack(take(-(-m * bits // 8)), bits, m).astype(np.float64)
        residual[:, i:i + m] = (2 * q - 1) * scale if bits == 1 else (q - 2 ** (bits - 1)) * scale
        i += m
    if coeffs is not None:
        residual = residual + coeffs @ _terms(terms, k - exact, cfg["normalize_t"]).T
    values = np.concatenate([parts[0], residual], axis=-1)
    return np.cumsum(values, axis=-1) if cfg["delta_encoding"] else values


def _as_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """(R, n) float64 -> (R, n * width) uint8 little-endian in dtype (bf16: rounded to nearest even)."""
    if dtype == "bfloat16":
        u = np.ascontiguousarray(values.astype("<f4")).view("<u4").astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
        return u.view(np.uint8).reshape(values.shape[0], -1)
    dt = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]
    return np.ascontiguousarray(values.astype(dt)).view(np.uint8).reshape(values.shape[0], -1)


def encode_logprobs(logprobs: np.ndarray, cfg: dict) -> np.ndarray:
    """(R, k) log-probs, highest first -> (R, B) uint8 in the config's layout (the module's text): the
    exact values, a least-squares fit of the rest stored in term_dtype (the residuals taken from the
    stored coefficients), each residual bin scaled by its largest magnitude and rounded to its bits.
    A row with any non-finite value (a position without targets) is written with NaN coefficients,
    so it reads back as listing nothing."""
    k, exact = cfg["k"], cfg["exact_k"]
    bad = ~np.isfinite(logprobs).all(-1)
    v = np.where(bad[:, None], 0.0, logprobs.astype(np.float64))
    if cfg["delta_encoding"]:
        v = np.concatenate([v[:, :1], np.diff(v, axis=-1)], -1)
    parts = [_as_bytes(np.where(bad[:, None], -np.inf, v[:, :exact]), cfg["exact_dtype"])] if exact else []
    rest, terms = v[:, exact:k], cfg["polynomial_terms"] or []
    if terms:
        X = _terms(terms, k - exact, cfg["normalize_t"])
        coef = np.linalg.lstsq(X, rest.T, rcond=None)[0].T
        stored = _floats(_as_bytes(coef, cfg["term_dtype"]), cfg["term_dtype"], len(terms))
        rest = rest - stored @ X.T
        parts.append(_as_bytes(np.where(bad[:, None], np.nan, coef), cfg["term_dtype"]))
    i = 0
    for b in cfg["residual_bins"] or []:
        bits, m = int(b["element_bits"]), int(b["num_elements"])
        r = rest[:, i:i + m]
        if bits == 1:   # sign times the mean magnitude (what minimizes the squared error of +-scale)
            scale = np.abs(r).mean(-1, keepdims=True)
            q = (r > 0).astype(np.int64)
        else:
            scale = np.abs(r).max(-1, keepdims=True) / 2 ** (bits - 1)
        scale = _floats(_as_bytes(np.where(scale == 0, 1.0, scale), b["scale_dtype"]), b["scale_dtype"], 1)
        if bits > 1:
            q = (np.clip(np.round(r / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1) + 2 ** (bits - 1)).astype(np.int64)
        parts += [_as_bytes(np.where(bad[:, None], np.nan, scale), b["scale_dtype"]), pack(q, bits)]
        i += m
    return np.concatenate(parts, axis=-1)


def encode_exact(logprobs: np.ndarray, cfg: dict) -> np.ndarray:
    """(R, k) log-probs, highest first -> (R, k * width) uint8: the lossless layout (exact_k = k, no
    polynomial, no bins, no delta encoding) that export writes; a partly listed row keeps its values."""
    assert cfg["exact_k"] == cfg["k"] and not cfg["polynomial_terms"] and not cfg["residual_bins"] \
        and not cfg["delta_encoding"]
    return _as_bytes(logprobs, cfg["exact_dtype"])


def files(folder: Path) -> list[Path]:
    """The capture's data_{i}.parquet files, in their numbered order."""
    found = sorted(Path(folder).glob("data_*.parquet"),
                   key=lambda p: int(p.stem.split("_")[-1]) if p.stem.split("_")[-1].isdigit() else -1)
    if not found:
        raise UserError(f"{folder} has no data_*.parquet files: not a DistillKit capture")
    return found


def check(folder: Path) -> dict:
    """The capture's config, and every data file opened as parquet with the three columns (its
    metadata only): what can be refused before anything is written. -> the config."""
    import pyarrow.parquet as pq

    cfg = read_config(folder)
    for f in files(folder):
        try:
            names = set(pq.ParquetFile(f).schema_arrow.names)
        except Exception as e:   # pyarrow's own errors on a file that is not parquet
            raise UserError(f"{f}: not a parquet file ({type(e).__name__}: {str(e)[:120]})") from None
        missing = {"input_ids", "compressed_logprobs", "bytepacked_indices"} - names
        if missing:
            raise UserError(f"{f}: missing the column{'s' if len(missing) > 1 else ''} {', '.join(sorted(missing))} "
                            "(a DistillKit capture has input_ids, compressed_logprobs and bytepacked_indices)")
    return cfg


def rows(folder: Path):
    """-> (row number, {"input_ids": [...], "labels": [...], "top": (ids (L-1, k), log-probs (L-1, k))},
    row j for token j + 1, an empty first row of L dropped) for every sequence, file after file, a record batch at a time (a capture is never read whole).
    labels: each token whose row lists something, -100 for token 0 and where a row is empty (no
    loss there: how stillroom's export marks them)."""
    import pyarrow.parquet as pq

    cfg = check(folder)
    k, bits = cfg["k"], index_bits(cfg["d"])
    n = 0
    for f in files(folder):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=["input_ids", "compressed_logprobs", "bytepacked_indices"]):
            for row in batch.to_pylist():
                n += 1
                lp, ix = row["compressed_logprobs"] or [], row["bytepacked_indices"] or []
                if len(lp) != len(ix):
                    raise UserError(f"{f} row {n}: {len(lp)} compressed_logprobs rows but {len(ix)} "
                                    "bytepacked_indices rows")
                if not lp:
                    yield n, {"input_ids": row["input_ids"], "labels": [-100] * len(row["input_ids"]),
                              "top": (np.zeros((0, k), np.int64), np.zeros((0, k)))}
                    continue
                try:
                    logp = decode_logprobs(np.array(lp, dtype=np.uint8), cfg)
                    ids = unpack(np.array(ix, dtype=np.uint8), bits, k)
                except UserError as e:
                    raise UserError(f"{f} row {n}: {e}") from None
                except ValueError:   # ragged byte rows
                    raise UserError(f"{f} row {n}: its byte rows differ in length") from None
                ids_in = row["input_ids"]
                if len(logp) == len(ids_in):   # open-instruct's L rows: row 0 is token 0's empty entry
                    ids, logp = ids[1:], logp[1:]
                elif len(logp) != len(ids_in) - 1:
                    raise UserError(f"{f} row {n}: {len(logp)} rows of log-probs for {len(ids_in)} tokens (need "
                                    f"{len(ids_in) - 1}, or {len(ids_in)} with the empty first)")
                listed = np.isfinite(logp).any(axis=-1)   # row j: token j + 1
                labels = [-100] + [t if listed[p - 1] else -100 for p, t in enumerate(ids_in) if p]
                yield n, {"input_ids": ids_in, "labels": labels, "top": (ids, logp)}


def entries(row: dict, n: int) -> list[dict | None]:
    """A decoded row's top-k (rows' row j: token j + 1) for its first n tokens (data.seq_len may cut
    it) -> per token {id: log-prob}, highest first (as served.prompt_logprobs_entries gives vLLM's);
    {} where nothing is listed, None for token 0."""
    ids, logp = row["top"]
    out = [None] + [{} for _ in range(n - 1)]
    for p in range(1, n):
        keep = np.isfinite(logp[p - 1])
        out[p] = {int(t): float(v) for t, v in sorted(zip(ids[p - 1][keep], logp[p - 1][keep]), key=lambda x: -x[1])}
    return out


def write(out: Path, stored, k: int, d: int, dtype: str = "float32", file_rows: int = 10_000, progress=True,
          layout: dict | None = None) -> int:
    """A DistillKit capture in folder `out` (made; its files written under temporary names and renamed):
    one parquet row per example, L - 1 byte rows each, in the lossless layout (exact_k = k in `dtype`:
    float32 keeps a float32 cache bit for bit), or in `layout` (a read_config dict: its k first
    entries of each position, compressed by encode_logprobs). stored: (example, {position: [(id,
    log-prob), ...]}, highest first) pairs; a position without any (no loss there) reads back as listing
    nothing. -> rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from tqdm.auto import tqdm

    from stillroom.run.folders import durable_replace

    cfg = {"d": d, "k": k, "exact_k": k, "exact_dtype": dtype, "polynomial_terms": None, "term_dtype": "float32",
           "residual_bins": [], "delta_encoding": False, "error_diffusion": False, "normalize_t": False}
    if layout is not None:
        if layout["k"] > k:
            raise UserError(f"the DistillKit layout keeps k = {layout['k']} entries a position; the cache holds {k}")
        cfg, k = {**layout, "d": max(layout["d"], d)}, layout["k"]
    encode = encode_exact if layout is None else encode_logprobs
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.uint64())),
                        pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    out.mkdir(parents=True, exist_ok=True)
    bits, n, index, batch, writer, tmp = index_bits(cfg["d"]), 0, 0, [], None, None

    def put():   # the batch into the open data file (opened when none is)
        nonlocal batch, writer, tmp
        if batch:
            if writer is None:
                tmp = out / f".data_{index}.parquet.tmp"
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch = []

    def flush():   # ... and that file closed and published
        nonlocal writer, index
        put()
        if writer is not None:
            writer.close()
            durable_replace(tmp, out / f"data_{index}.parquet")
            writer, index = None, index + 1

    for e, top in tqdm(stored, desc="cache -> distillkit", unit="row", disable=not progress):
        L = len(e.input_ids)
        ids = np.zeros((L - 1, k), dtype=np.int64)
        logp = np.full((L - 1, k), -np.inf)
        for p, pairs in top.items():
            for j, (t, v) in enumerate(pairs[:k]):
                ids[p, j], logp[p, j] = t, v
        batch.append({"input_ids": list(e.input_ids), "compressed_logprobs": encode(logp, cfg).tolist(),
                      "bytepacked_indices": pack(ids, bits).tolist()})
        n += 1
        if n % file_rows == 0:
            flush()
        elif len(batch) >= 256:
            put()
    flush()
    tmp_cfg = out / f".{CONFIG}.tmp"
    tmp_cfg.write_text(yaml.safe_dump(cfg))
    durable_replace(tmp_cfg, out / CONFIG)
    return n


__all__ = ["read_config", "check", "decode_logprobs", "encode_exact", "pack", "unpack", "rows", "entries", "write",
           "files"]
