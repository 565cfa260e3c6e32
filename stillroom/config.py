"""Typed config: one pydantic model per concern (the schema; `recipes.py` reads YAML and overrides into it).

The defaults below ARE the embedded default run (`stillroom distill` with no config, `make demo`):
the bundled SmolLM2-135M-Instruct teacher answers the bundled instructions once, and a 6-layer
student cut from its layers learns those answers with soft labels, in about 15 minutes on 2 CPU cores.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)   # a field's docstring is its help (docs, --help)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v, info):
        """pydantic reads true as 1 for a number; train.max_steps=true is a mistake, not one step."""
        if isinstance(v, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            from pydantic_core import PydanticCustomError
            raise PydanticCustomError("bool_as_number", "a number is expected, not true/false")
        return v


def _numeric(annotation) -> bool:
    """Is a field a number (int or float, maybe optional) and never a bool?"""
    import typing
    args = set(typing.get_args(annotation)) or {annotation}
    return bool(args & {int, float}) and bool not in args


def scheduled(start: float, end: float | None, step: int, total: int, kind: str = "linear") -> float:
    """A value moving from `start` (step 0) to `end` (step total - 1): constant (end None or
    kind "constant"), linear, or cosine (half a cosine: slow at both ends)."""
    if end is None or kind == "constant" or total <= 1:
        return float(start)
    x = min(max(step / (total - 1), 0.0), 1.0)
    if kind == "cosine":
        x = 0.5 * (1 - math.cos(math.pi * x))
    elif kind != "linear":
        raise ValueError(f"schedule must be constant, linear or cosine, got {kind!r}")
    return float(start + (end - start) * x)


# a live teacher's attention (transformers' attn_implementation): teacher.attention, teacher.mix[].attention
Attention = Literal["auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"]


class MixTeacherConfig(Section):
    """One more teacher in a mixture (same tokenizer as the student)."""
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """What teacher.route_field values call it."""
    model: Optional[str] = Field(None, min_length=1)
    """This teacher's model: a folder, a .gguf file, a hub id or a bundled name."""
    kind: Literal["live", "cache"] = "live"
    """live: run the model; cache: read its top-k outputs from `cache` (stillroom cache)."""
    cache: Optional[str] = None
    """The cache folder when kind is cache."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The teacher's weights' dtype (auto: bf16 where the CPU or GPU runs it fast, else fp32)."""
    attention: Attention = "auto"
    """As teacher.attention."""
    weight: float = Field(1.0, ge=0.0)
    """Its share of the mixture (all teachers' weights are normalized to sum to 1)."""
    offload: bool = False
    """As teacher.offload: its decoder layers in host memory, each on the accelerator only for its own forward."""

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "cache" and not self.cache:
            raise ValueError(f"teacher.mix '{self.name}': kind=cache needs cache (a folder written by `stillroom cache`)")
        if self.kind == "live" and not self.model:
            raise ValueError(f"teacher.mix '{self.name}': a live teacher needs model")
        return self


class ServedConfig(Section):
    """teacher.kind=served: an OpenAI-compatible server that scores the training text (vLLM, llama.cpp's
    server), so the teacher stays out of training memory (docs/cache.md#a-served-teacher)."""
    url: Optional[str] = Field(None, min_length=1)
    """The server's base URL, e.g. http://127.0.0.1:8000/v1."""
    model: Optional[str] = Field(None, min_length=1)
    """The model name the server serves (default: teacher.model)."""
    api: Literal["auto", "prompt_logprobs", "echo"] = "auto"
    """The request's shape: prompt_logprobs (vLLM: token ids in, top-k per prompt token out), echo
    (the legacy completions API: echo + logprobs, llama.cpp's server), auto: the first that answers."""
    top_k: int = Field(20, ge=1, le=1000)
    """Log-probs per position asked of the server (vLLM's default --max-logprobs is 20)."""
    concurrency: int = Field(8, ge=1, le=256)
    """Requests in flight at once (one per example)."""
    retries: int = Field(6, ge=0, le=50)
    """Retries of a failed request (connection errors, 408/409/429/5xx; exponential backoff)."""
    timeout: float = Field(120.0, gt=0)
    """Seconds before a request is given up (and retried)."""
    api_key_env: str = Field("OPENAI_API_KEY", min_length=1)
    """The environment variable holding the server's API key, if it wants one."""


class TeacherConfig(Section):
    """The model whose knowledge is distilled: a live model, its cached top-k outputs, or a server
    that scores the text."""
    model: str = Field("smollm2-135m", min_length=1)
    """Short name (smollm2-135m), a Hugging Face model folder or hub id, or a .gguf file."""
    kind: Literal["live", "cache", "served"] = "live"
    """live: run the teacher beside the student. cache: read its top-k outputs from teacher.cache
    (written by `stillroom cache`). served: a server scores the text (teacher.served); teacher.model
    then names its tokenizer and config. With cache or served the teacher is not loaded (except once
    to copy its layers for student.init=from_teacher)."""
    cache: Optional[str] = None
    """teacher.kind=cache: the folder `stillroom cache` wrote."""
    served: ServedConfig = ServedConfig()
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The live teacher's weights: auto = bfloat16 where the device runs it natively (a CUDA GPU
    with bf16, a CPU with AVX512-BF16 or AMX), else float32 (elsewhere bf16 is emulated, slower)."""
    attention: Attention = "auto"
    """The live teacher's attention (transformers' attn_implementation): auto = eager on a CPU for
    data.seq_len up to 1024 (faster there than PyTorch's CPU flash kernel, measured by
    bench/attention.py: docs/results.md), else the model's own (sdpa on a GPU). The student keeps
    its own."""

    name: str = Field("teacher", pattern=r"^[A-Za-z0-9_.-]+$")
    """This teacher's name in teacher.route_field values."""
    weight: float = Field(1.0, ge=0.0)
    """Its share of the mixture when teacher.mix lists more teachers (weights are normalized)."""
    offload: bool = False
    """Keep the live teacher's decoder layers in host memory (pinned on CUDA) and copy each to the
    accelerator only for its own forward: the device holds its embeddings, head and one layer at a
    time. Nothing to offload on a CPU."""
    shard: bool = False
    """With train.shard=fsdp: shard this teacher too (its decoder layers across the processes,
    gathered one at a time for its forward), so a teacher larger than one device fits."""
    mix: list[MixTeacherConfig] = []
    """More teachers of the same tokenizer. The soft target is the mixture sum_k w_k p_k of their
    distributions (Wu et al. 2021 / MT-KD); with route_field, each example's own teacher instead."""
    route_field: Optional[str] = None
    """Per-example routing: the JSONL field whose value names the example's teacher (this one's
    `name`, or a mix entry's)."""

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "cache" and not self.cache:
            raise ValueError("teacher.kind=cache needs teacher.cache (a folder written by `stillroom cache`)")
        if self.kind == "served" and not self.served.url:
            raise ValueError("teacher.kind=served needs teacher.served.url (the server's base URL, e.g. "
                             "http://127.0.0.1:8000/v1)")
        names = [self.name] + [m.name for m in self.mix]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be distinct, got {names}")
        if self.mix and not self.route_field and self.weight + sum(m.weight for m in self.mix) <= 0:
            raise ValueError("the teachers' weights sum to 0")
        return self


class StudentConfig(Section):
    """The model trained: cut from the teacher's layers, built fresh, or an existing one."""
    init: Literal["from_teacher", "config", "pretrained"] = "from_teacher"
    """from_teacher: keep some of the teacher's layers (weights copied); config: a fresh model of the
    teacher's family; pretrained: an existing model (student.model)."""
    num_layers: Optional[int] = Field(6, ge=1)
    """from_teacher: keep this many layers spread evenly, first and last kept; config: depth."""
    layers: Optional[list[int]] = None
    """from_teacher: keep exactly these teacher layers (overrides num_layers)."""
    hidden_size: Optional[int] = Field(None, ge=1)
    """init=config: the student's width (default: the teacher's)."""
    num_heads: Optional[int] = Field(None, ge=1)
    """init=config: attention heads (default: the teacher's)."""
    num_kv_heads: Optional[int] = Field(None, ge=1)
    """init=config: key/value heads (grouped-query attention; default: num_heads or the teacher's ratio)."""
    intermediate_size: Optional[int] = Field(None, ge=1)
    """init=config: the MLP's width (default: the teacher's ratio to hidden_size)."""
    model: Optional[str] = Field(None, min_length=1)
    """pretrained: folder, hub id or .gguf file of the student. from_teacher / config: the model
    whose layers / config and tokenizer the student starts from (default: the teacher) -- for a
    cross-tokenizer teacher, the student's own family."""

    prune_heads: Optional[int] = Field(None, ge=1)
    """Width pruning (Minitron): keep this many attention heads per layer, the most important on
    calibration data (a multiple of the key/value heads). Combines with from_teacher's depth."""
    prune_intermediate: Optional[int] = Field(None, ge=1)
    """Width pruning: keep this many MLP channels per layer, the most important on calibration data."""
    attention: Attention = "auto"
    """The student's attention implementation. auto: the model's own (sdpa for most models).
    flash_attention_2 / flash_attention_3 (their package installed, on a GPU) keep packed rows
    (data.pack) on a variable-length flash kernel; eager; flex_attention. An implementation this
    install cannot run is refused before the data is read."""
    calibration_examples: int = Field(32, ge=1)
    """Training examples whose activations rank the heads and channels."""

    @model_validator(mode="after")
    def _needs(self):
        if self.init == "pretrained" and not self.model:
            raise ValueError("student.init=pretrained needs student.model (a folder, hub id or .gguf)")
        if self.init == "config" and not (self.hidden_size and self.num_layers and self.num_heads):
            raise ValueError("student.init=config needs student.hidden_size, student.num_layers "
                             "and student.num_heads")
        return self


class DataConfig(Section):
    """What the student trains and is evaluated on (see the data formats), tokenized once into the data store."""
    path: Optional[str] = None
    """Text file, JSONL, HF dataset folder or hub id; None = teacher answers to bundled prompts."""
    format: Literal["auto", "text", "jsonl", "hf"] = "auto"
    """auto: from the path (.txt text, .jsonl rows, a folder a Hugging Face dataset, else a hub id)."""
    split: str = "train"
    """Split of a Hugging Face dataset."""
    eval_path: Optional[str] = None
    """Held-out file; None = a deterministic eval_fraction of `path`."""
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the examples held out for evaluation (a deterministic split by train.seed) when no eval_path."""
    seq_len: int = Field(256, ge=8, le=1 << 20)
    """Tokens per example: longer rows are cut, text is packed into blocks of this length."""
    max_examples: Optional[int] = Field(None, ge=1)
    """Use at most this many examples (after the split: a quick run on a large file)."""
    skip_bad_rows: bool = False
    """Skip bad rows and report them (how many, which) instead of stopping at the first one."""
    fields: Optional[dict[Literal["prompt", "response", "text", "messages"], str]] = None
    """Which keys of the rows hold the prompt and response (or the text, or the messages), for
    rows in none of the formats stillroom reads by itself (docs/data.md), e.g.
    {prompt: query, response: reply}."""
    store: str = "auto"
    """Where the tokenized data is kept (docs/scale.md): auto = a store under the
    stillroom cache (~/.cache/stillroom/data), built on first use and reused while the data files,
    tokenizer and data settings are unchanged; a folder = stores there; off = tokenized in memory
    on every run."""
    workers: Optional[int] = Field(None, ge=1)
    """Processes that tokenize a store's data (None: one per core, for files over 8 MB)."""

    @field_validator("store", mode="before")
    @classmethod
    def _store_words(cls, v):   # YAML reads a bare off / on as booleans
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v
    pack: bool = False
    """Pack whole training examples (prompt+response, chat) several to a row of seq_len tokens
    (first-fit decreasing), each attending only to itself: no padding waste. JSONL text rows are
    always packed this way; a plain text file is one document cut into blocks."""


class GenerateConfig(Section):
    """How the teacher answers prompts (`stillroom generate`, and the embedded default data)."""
    prompts: Optional[str] = None
    """.txt (one per line), JSONL, or a Hugging Face dataset folder / hub id; unset: the bundled
    instructions. Rows give the prompt as `prompt_field`, else prompt / instruction (+ input) /
    question / messages (the conversation before its last assistant turn)."""
    prompt_field: Optional[str] = None
    """The rows' prompt key, for rows in no known format."""
    split: str = "train"
    """Split of a Hugging Face dataset of prompts."""
    system: Optional[str] = None
    """A system message put before every prompt."""
    num_prompts: Optional[int] = Field(None, ge=1)
    """Answer at most this many prompts (default: all)."""
    dedup: bool = True
    """Drop repeated prompts (after whitespace normalization) and repeated answers to a prompt."""
    max_prompt_tokens: Optional[int] = Field(None, ge=1)
    """Skip (and report) prompts longer than this once rendered with the chat template."""
    num_answers: int = Field(1, ge=1)
    """Answers per prompt (one output row each); > 1 needs temperature > 0."""
    max_new_tokens: int = Field(64, ge=1)
    """Answer length limit in tokens (a cut answer is marked truncated)."""
    batch_size: int = Field(32, ge=1, le=65536)
    """Prompts answered together."""
    temperature: float = Field(0.0, ge=0.0)
    """0 = greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling's probability mass (1 = off)."""
    top_k: int = Field(0, ge=0)
    """0 = no top-k filter."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Sampling seed (each batch's seed derives from it, so a resumed file is the same)."""

    @model_validator(mode="after")
    def _sampling(self):
        if self.num_answers > 1 and self.temperature == 0:
            raise ValueError("generate.num_answers > 1 needs generate.temperature > 0 "
                             "(greedy answers to one prompt are all the same)")
        return self


class CacheConfig(Section):
    """`stillroom cache`: the teacher's top-k next-token distributions over the data, stored once."""
    path: str = "runs/cache"
    """Where the cache is written (a folder)."""
    source: Literal["teacher", "logprobs", "vllm", "axolotl", "distillkit"] = "teacher"
    """teacher: run the teacher over the data (teacher.kind live or served). logprobs: read the
    `teacher_logprobs` that `stillroom generate --api ... --top-logprobs K` stored in data.path.
    vllm: read a vLLM prompt_logprobs capture at data.path (rows of prompt_token_ids and
    prompt_logprobs; docs/cache.md#captures-from-other-tools). axolotl: read an axolotl KD dataset
    at data.path (rows of input_ids and top-k logprobs). distillkit: read a DistillKit or
    open-instruct capture, the folder at data.path (data_*.parquet and compression_config.yaml).
    With logprobs, vllm, axolotl and distillkit no teacher runs: teacher.model only names the
    tokenizer, which must be the one the capture used."""
    top_k: int = Field(64, ge=1)
    """Log-probs kept per position (plus the tail mass and the true token's log-prob)."""
    dtype: Literal["float16", "float32", "packed"] = "float16"
    """Storage of the top-k log-probs. float16 / float32: ids as uint16 (int32 past 65,536 tokens),
    tail and true-token log-probs float32. packed: ids delta-coded (about 9 bits each) and log-probs
    on a 6-bit grid per position, the top-1 kept exact; top_k 160 packed takes fewer bytes than
    DistillKit's default layout and reconstructs the teacher better (docs/cache.md#packed-caches)."""
    shard_rows: int = Field(65536, ge=1)
    """Positions per shard file: the writer's memory bound, and what a killed run can lose."""
    batch_size: int = Field(8, ge=1, le=65536)
    """Examples per teacher forward pass."""


class LossConfig(Section):
    """What the student minimizes: CE on the labels plus the teacher's term(s), and how they are weighted."""
    kind: Literal["soft", "hard"] = "soft"
    """soft: the teacher's distribution (a divergence); hard: its argmax tokens as labels."""
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    """Weight of the KD term; 1 - alpha weighs CE on the true labels."""
    temperature: float = Field(1.0, gt=0.0)
    """T on both sides of the soft term (the loss is scaled by T^2)."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tv"] = "forward_kl"
    """The soft KD term D(teacher, student) (see stillroom.losses.DIVERGENCES): forward_kl (Hinton),
    reverse_kl (MiniLLM), jsd (GKD's generalized JSD: beta 0 = forward KL, 1 = reverse KL),
    skew_kl / skew_rkl (DistiLLM, skew = beta), tv (total variation)."""
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """jsd's beta, or the skew of skew_kl / skew_rkl."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """How alpha and temperature move from their values at step 0 to alpha_end / temperature_end
    at the last step (each stays constant while its *_end is unset)."""
    alpha_end: Optional[float] = Field(None, ge=0.0, le=1.0)
    """With a schedule: alpha's value at the last step."""
    temperature_end: Optional[float] = Field(None, gt=0.0)
    """With a schedule: the temperature at the last step."""
    terms: Optional[dict[str, float]] = None
    """A weighted list of loss terms instead of alpha / kind / divergence, e.g.
    {ce: 0.3, forward_kl: 0.5, hidden_cosine: 0.2}. Names: ce, hard, forward_kl, reverse_kl, jsd,
    skew_kl, skew_rkl, tv (the teacher's distribution), hidden_cosine, hidden_mse, attention
    (intermediate layers, through loss.layer_map)."""
    layer_map: Optional[list[list[int]]] = None
    """[[student layer, teacher layer], ...] for hidden_* / attention terms; None = each student
    layer with the teacher layer it was cut from (from_teacher), else spread evenly."""
    token_weight: Literal["none", "confidence", "entropy"] = "none"
    """Weigh each position's teacher terms by the teacher's top-1 probability (confidence) or by
    1 - its normalized entropy there."""
    balance: bool = False
    """Scale the teacher terms by the running ratio CE / KD of their raw per-token sizes, so their
    weights (alpha, or loss.terms) set the terms' actual shares."""
    balance_decay: float = Field(0.9, ge=0.0, lt=1.0)
    """Running-mean decay of the balancing."""
    on_policy: float = Field(0.0, ge=0.0, le=1.0)
    """GKD's lambda: the fraction of steps on which the student writes the continuations of the
    prompts and the teacher scores them (targets on the student's tokens, up to EOS)."""
    on_policy_tokens: int = Field(32, ge=1)
    """New tokens per on-policy continuation."""
    on_policy_temperature: float = Field(1.0, ge=0.0)
    """The student's sampling temperature on-policy (0 = greedy)."""
    on_policy_prompt_tokens: int = Field(32, ge=1)
    """Prompt length for examples that are all text (no prompt/response split)."""
    cross_tokenizer: Literal["none", "uld"] = "none"
    """uld: the teacher's tokenizer differs from the student's; its KD term becomes Universal
    Logit Distillation (sorted-probability Wasserstein) at positions where both have read the same
    text, plus match_weight x KL over the tokens both vocabularies share."""
    match_weight: float = Field(1.0, ge=0.0)
    """loss.cross_tokenizer=uld: weight of the KL over the tokens both vocabularies spell the same."""
    chunk_rows: Optional[int] = Field(None, ge=1)
    """Rows (positions) per chunk of the loss: smaller = less memory, more loop overhead. None =
    about 8M logits per chunk (128 rows at a 49k vocabulary, 32 at 262k)."""
    lean: bool = True
    """Make the logits inside the loss, chunk by chunk, from both models' final hidden states and
    only at positions with a label (never a full (batch, seq, vocab) tensor). false: the plain
    path on the models' full logits. Models whose logits are not a plain linear head of their
    last hidden state (soft-capping) use the plain path either way."""
    compile: Literal["auto", True, False] = "auto"
    """Run the loss's hot chunk (one soft forward-KL target, live or cached, and CE, or CE alone)
    through torch.compile: a faster KD step on a CPU (bench/peers.py: docs/results.md), the same
    values within fp32 rounding, a few seconds of compiling at the first step (cached on disk after). auto: on a CPU at a vocabulary of 8192 or more; off on a
    GPU, where it is not measured yet. It needs a C++ compiler on a CPU: without one the eager
    kernel runs, with one warning."""

    def spec(self, step: int = 0, total_steps: int = 1) -> dict[str, float]:
        """The one loss spec the code past the config reads: {term: weight} at optimizer step `step`
        of `total_steps`, terms of weight 0 left out. loss.terms as given; the seed's spelling read
        as {ce: 1 - alpha, <divergence, or hard for kind=hard>: alpha}, alpha under the schedule."""
        if self.terms:
            return {k: float(v) for k, v in self.terms.items() if v}
        alpha = scheduled(self.alpha, self.alpha_end, step, total_steps, self.schedule)
        kd = "hard" if self.kind == "hard" else self.divergence
        return {k: v for k, v in (("ce", 1.0 - alpha), (kd, alpha)) if v}

    def weights(self, step: int, total_steps: int) -> tuple[float, float]:
        """(alpha, temperature) at optimizer step `step` under the schedule (what the log reports)."""
        return (scheduled(self.alpha, self.alpha_end, step, total_steps, self.schedule),
                scheduled(self.temperature, self.temperature_end, step, total_steps, self.schedule))

    @model_validator(mode="after")
    def _terms(self):
        if self.terms is not None:
            from stillroom.objectives.methods import TERM_NAMES
            for k, v in self.terms.items():
                if k not in TERM_NAMES:
                    close = difflib.get_close_matches(k, TERM_NAMES, n=1)
                    raise ValueError(f"loss.terms: unknown term '{k}'" +
                                     (f" (did you mean '{close[0]}'?)" if close else f" (terms: {', '.join(TERM_NAMES)})"))
                if not isinstance(v, (int, float)) or v < 0 or v != v or v == float("inf"):
                    raise ValueError(f"loss.terms.{k}: a weight >= 0 is expected, got {v!r}")
            if not any(self.terms.values()):
                raise ValueError("loss.terms: every weight is 0")
            if self.alpha_end is not None:
                raise ValueError("loss.alpha_end schedules alpha, which loss.terms replaces: drop one of them")
        return self


class TrainConfig(Section):
    """The optimizer, the schedule, checkpoints and the run folder."""
    output_dir: str = "runs/demo"
    """The run folder: config.yaml, metrics.jsonl, checkpoints/, final/, report.html."""
    max_steps: int = Field(120, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(8, ge=1, le=65536)
    """Examples per optimizer step (split into grad_accum micro-batches, and over processes)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per step (the loss is normalized over the step's target tokens either way)."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW's weight decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine schedule ends at lr x this."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """0 disables clipping."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seeds the student's init, the data order and the held-out split (0 .. 2^32-1)."""
    log_every: int = Field(10, ge=1)
    """Steps between log lines (metrics.jsonl and the progress bar)."""
    eval_every: int = Field(0, ge=0)
    """0 = evaluate only before and after training."""
    save_every: int = Field(0, ge=0)
    """0 = no intermediate checkpoints (the final student is always written)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept (older ones are deleted once a newer one is complete)."""
    max_bad_steps: int = Field(10, ge=0)
    """Steps whose loss or gradient is not finite are skipped (no update) and counted; one more
    than this stops the run with a message (0: stop at the first)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations during the backward instead of keeping them
    (transformers' gradient checkpointing, non-reentrant): far less activation memory for a larger
    batch or a longer data.seq_len, about a third more compute; the same gradients."""
    deterministic: bool = False
    """Bit-exact reruns on CUDA: PyTorch's deterministic algorithms (an op that has none stops
    the run with PyTorch's error), cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8), no
    cuDNN autotuning; slower. Without it a GPU run repeats only to rounding (atomic adds in some
    backward kernels, the flash attention backward). On a CPU runs are bit-exact either way; two
    processes differ from one only in the gradient sum's order (rounding)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast (fp32 weights, optimizer state and loss) where the device runs bf16
    natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX), fp32 elsewhere."""
    report_to: list[Literal["tensorboard", "trackio", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
                            "swanlab"]] = []
    """Trackers through Accelerate, e.g. [tensorboard] (written under <output_dir>/stillroom): the
    loss, each logged term, lr, tokens/s and every evaluation, by optimizer step."""
    threads: int = Field(0, ge=0)
    """CPU threads per process for torch; 0 = auto: OMP_NUM_THREADS if set, else the machine's cores
    shared out among the processes on it (so N processes do not each claim every core)."""
    qat: Literal["none", "q8_0", "q4_0"] = "none"
    """Quantization-aware distillation: train the decoder blocks' linear weights through the exact
    quantizer of this GGUF type (straight-through gradients), and store the quantized values in
    final/, so `stillroom export --type` of the result computes what was trained."""
    prefetch: bool = True
    """Build the next step's batches (padding, cached teacher rows) on a background thread."""
    shard: Literal["none", "fsdp"] = "none"
    """Under several processes: none = data-parallel, every process holds the whole student and its
    optimizer state; fsdp = FSDP2 (fully_shard per decoder layer): each holds 1/N of them (see
    docs/scale.md)."""

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no(cls, v):   # YAML 1.1 reads a bare `no` (train.mixed_precision=no) as false
        return "no" if v is False else v


class EvalConfig(Section):
    """The evaluation before and after training (the table), and generation tasks."""
    max_batches: Optional[int] = Field(None, ge=1)
    """Evaluate on at most this many held-out batches (default: all)."""
    batch_size: int = Field(8, ge=1, le=65536)
    """Held-out examples per forward pass."""
    gen_tokens: int = Field(32, ge=1)
    """New tokens per prompt when timing generation speed."""
    gen_prompts: int = Field(4, ge=1)
    """Held-out prompts to time generation on."""
    tasks: list[Literal["rouge", "exact_match"]] = []
    """Generation tasks scored on the teacher and on the student before and after training (docs/evaluate.md):
    rouge (ROUGE-L vs the reference answers, and the student's vs the teacher's) or
    exact_match (GSM8K '#### n' answers). Their rows: task_data."""
    task_data: Optional[str] = None
    """Rows with reference answers for eval.tasks (JSONL or a dataset folder); None = data.eval_path.
    Not the training data: a score on rows the student trained on says little."""
    task_rows: int = Field(32, ge=1)
    """Rows answered per task (greedy answers are slow on a CPU)."""
    max_new_tokens: int = Field(64, ge=1)
    """Answer length limit for the generation tasks (eval.tasks; `stillroom eval --task`)."""


class PeerConfig(StudentConfig):
    """One co-distillation peer: a student spec (init from_teacher / config / pretrained) + a name."""
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Names the peer's folder under <output_dir>/final/."""
    lr: Optional[float] = Field(None, gt=0.0)
    """This peer's peak learning rate; None = train.lr."""


class CodistillConfig(Section):
    """Co-distillation: how the peers exchange what they know (stillroom codistill)."""
    mode: Literal["mutual", "predictions", "weights"] = "mutual"
    """mutual: all peers in each process, same batches (Deep Mutual Learning; data-parallel under
    accelerate launch). predictions: one peer per process, each on its own data shard; every step
    the peers' predictions on a shared batch are all-gathered. weights: one peer per process, own
    shard; every exchange_every steps the weights are exchanged and each peer distills toward its
    stale copies of the others (Anil et al. 2018)."""
    teacher_weight: float = Field(0.0, ge=0.0, le=1.0)
    """Share of loss.alpha given to the fixed teacher (0 = peers only; the rest is split over peers)."""
    top_k: int = Field(0, ge=0)
    """predictions mode: exchange each position's top-k log-probs + tail mass; 0 = full distributions."""
    exchange_every: int = Field(50, ge=1)
    """weights mode: steps between weight exchanges (K)."""
    burn_in: int = Field(0, ge=0)
    """Steps before the peer terms switch on (their weight goes to CE until then)."""
    ramp: int = Field(0, ge=0)
    """Steps after burn_in over which the peer terms' weight rises linearly from 0 to its full
    share (the rest goes to CE meanwhile); 0 = full at once."""
    confidence: bool = False
    """Weight each peer's term at each position by that peer's top-1 probability there (a sure
    peer teaches more, an unsure one less; the weight it does not get is dropped, not moved to
    CE). Modes mutual and weights."""
    shared_batch_size: Optional[int] = Field(None, ge=1)
    """predictions mode: examples in the step's shared batch; None = train.batch_size."""


class FinetuneConfig(Section):
    """Multi-stage: after distilling, fine-tune the student on labelled data (CE only) in the same
    command; the distilled student stays in <output_dir>/final, the fine-tuned one goes to
    <output_dir>/finetune/final."""
    data: str
    """Labelled data (the same formats as data.path); `facts` = 48 short hand-written question /
    answer pairs shipped with stillroom (stillroom/assets/facts.jsonl), for trying the recipe."""
    max_steps: int = Field(50, ge=1)
    """Fine-tuning steps."""
    lr: float = Field(2e-4, gt=0.0)
    """Fine-tuning learning rate."""

    @model_validator(mode="after")
    def _bundled(self):
        if self.data == "facts":
            object.__setattr__(self, "data", str(Path(__file__).parent / "assets" / "facts.jsonl"))
        return self
    batch_size: Optional[int] = Field(None, ge=1, le=65536)
    """Examples per fine-tuning step (default: train.batch_size)."""


class Config(Section):
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    data: DataConfig = DataConfig()
    generate: GenerateConfig = GenerateConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    cache: CacheConfig = CacheConfig()
    finetune: Optional[FinetuneConfig] = None
    """Optional second stage: fine-tune the distilled student on labelled data (see finetune.*)."""

    @model_validator(mode="after")
    def _across(self):
        from stillroom.objectives.rules import check_across
        check_across(self)
        return self


class CodistillRunConfig(Section):
    """`stillroom codistill`: peers instead of one student, plus the codistill section.

    The teacher provides the tokenizer, layers for from_teacher peers, the embedded default data
    (its answers to the bundled prompts), the reference in the evaluation, and, with
    codistill.teacher_weight > 0, a fixed extra signal.
    """
    teacher: TeacherConfig = TeacherConfig()
    peers: list[PeerConfig] = Field(default_factory=lambda: [
        PeerConfig(name="a", init="from_teacher", num_layers=4),
        PeerConfig(name="b", init="from_teacher", layers=[0, 7, 14, 21, 29])])
    """The models trained together: each a student spec with a name (its folder under final/)."""
    codistill: CodistillConfig = CodistillConfig()
    data: DataConfig = DataConfig()
    generate: GenerateConfig = GenerateConfig()
    loss: LossConfig = LossConfig(alpha=0.5)
    train: TrainConfig = TrainConfig(output_dir="runs/codistill", max_steps=100)
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _peers(self):
        from stillroom.objectives.rules import check_codistill
        check_codistill(self, LossConfig())
        return self
