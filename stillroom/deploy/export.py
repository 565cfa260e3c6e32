"""`stillroom export`: a student as a GGUF file for llama.cpp / Ollama (and transformers' GGUF loader).

Written with the `gguf` package (llama.cpp's own writer): the llama architecture's metadata, the
tokenizer (byte-level BPE: tokens, types, merges, special ids, chat template) and the tensors under
llama.cpp's names, the q / k projections permuted the way llama.cpp's converter does. Types:

    f16    every matrix in float16 (norms stay float32)
    q8_0   matrices in Q8_0 (blocks of 32 int8 with one scale: ~8.5 bits per weight)
    q4_0   matrices in Q4_0 (blocks of 32 int4 with one scale: ~4.5 bits), embeddings in Q8_0

Every export is read back with transformers' GGUF loader and its logits compared with the PyTorch
model's on a fixed text; the result is printed and stored beside the file (`<file>.check.json`).
Supported: Llama-family students (what stillroom builds from the bundled teacher) with a
byte-level BPE tokenizer; anything else is refused with one line.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from stillroom.errors import UserError

log = logging.getLogger("stillroom")

TYPES = ("f16", "q8_0", "q4_0")
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
CHECK_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
              "One day, she saw a big red ball in the park and ran to get it.")


def gguf_name(hf: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        short = LAYER.get(".".join(parts[3:-1]))
        if short:
            return f"blk.{parts[2]}.{short}.weight"
    return None


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout -> llama.cpp's (the inverse of transformers' _reverse_permute_weights)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_fields(writer, tok, bundled_pre: str | None):
    import gguf

    data = json.loads(tok.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or not any("ByteLevel" in json.dumps(data.get(k) or {})
                                            for k in ("pre_tokenizer", "decoder")):
        raise UserError("export to GGUF supports byte-level BPE tokenizers (GPT-2 / SmolLM2 style); "
                        f"this one is {model.get('type')}")
    n = len(tok)
    tokens = tok.convert_ids_to_tokens(list(range(n)))
    special = set(tok.all_special_ids)
    added = {a.content for a in tok.added_tokens_decoder.values()} if hasattr(tok, "added_tokens_decoder") else set()
    types = [gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bundled_pre or "gpt-2")   # llama.cpp's name for GPT-2's splitting
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id),
                     ("pad", tok.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    writer.add_add_bos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _same_vocab_as_bundled(tok) -> str | None:
    """The bundled SmolLM2 GGUF's pre-tokenizer name when tok is that tokenizer (llama.cpp then splits
    text exactly as transformers does), else None."""
    try:
        import gguf

        from stillroom.models.core import bundled_gguf
        r = gguf.GGUFReader(str(bundled_gguf("smollm2-135m")))
        f = r.fields["tokenizer.ggml.tokens"]
        if len(f.data) != len(tok):
            return None
        first = [bytes(f.parts[i]).decode("utf-8") for i in f.data[:2000]]
        if first != tok.convert_ids_to_tokens(list(range(2000))):
            return None
        return r.fields["tokenizer.ggml.pre"].contents()
    except Exception:   # no bundled teacher here: fall back to the generic name
        return None


def write_gguf(model, tok, out: Path, qtype: str, name: str = "stillroom student") -> Path:
    """model (a transformers Llama) + tokenizer -> GGUF file `out` of type qtype. Atomic."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if qtype not in TYPES:
        raise UserError(f"--type {qtype}: choose one of {', '.join(TYPES)}")
    cfg = model.config
    if cfg.model_type != "llama":
        raise UserError(f"export to GGUF supports Llama-family models; this one is {cfg.model_type}")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(theta))
    w.add_vocab_size(model.get_output_embeddings().weight.shape[0])
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    _tokenizer_fields(w, tok, _same_vocab_as_bundled(tok))
    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf, t in state.items():
        g = gguf_name(hf)
        if g is None:
            if hf.endswith("rotary_emb.inv_freq"):
                continue
            raise UserError(f"export to GGUF: no llama.cpp name for tensor {hf}")
        if g == "output.weight" and tied:
            continue   # llama.cpp reads the tied head from token_embd
        a = t.detach().float().cpu().numpy()
        if g.endswith("attn_q.weight"):
            a = permute(a, heads)
        elif g.endswith("attn_k.weight"):
            a = permute(a, kv)
        if a.ndim == 1:
            w.add_tensor(g, a.astype(np.float32))
            continue
        want = {"f16": Q.F16, "q8_0": Q.Q8_0,
                "q4_0": Q.Q8_0 if g in ("token_embd.weight", "output.weight") else Q.Q4_0}[qtype]
        if want != Q.F16 and a.shape[-1] % 32:
            want = Q.F16    # block types need rows of a multiple of 32
        if want == Q.F16:
            w.add_tensor(g, a.astype(np.float16))
        else:
            w.add_tensor(g, gguf.quants.quantize(a, want), raw_dtype=want)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def _stats(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """KL(ref || got) per token, top-1 agreement and the largest logit difference."""
    lp, lq = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    return {"kl_per_token": float((lp.exp() * (lp - lq)).sum(-1).mean()),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "max_abs_logit_diff": float((ref.float() - got.float()).abs().max())}


@torch.no_grad()
def check(model, tok, path: Path, text: str = CHECK_TEXT) -> dict:
    """The exported file against the PyTorch model on `text`: read back by transformers' GGUF loader
    and, where llama-cpp-python is installed, run by llama.cpp itself."""
    from transformers import AutoModelForCausalLM

    ids = tok(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    model = model.float().eval()
    ref = model(input_ids=x).logits[0]
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    out = {"tokens": len(ids), "transformers": _stats(ref, back(input_ids=x).logits[0])}
    try:
        import llama_cpp
    except ImportError:
        out["llama_cpp"] = None     # not installed: `pip install llama-cpp-python` to check with it too
        return out
    try:
        llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=2)
    except ValueError as e:   # llama.cpp says why on its own stderr
        out["llama_cpp"] = {"error": str(e)}
        return out
    llm.eval(ids)
    scores = torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)
    out["llama_cpp"] = _stats(ref, scores[:, :ref.shape[-1]])
    # the file's own tokenizer, as llama.cpp reads it, splits the text as transformers does
    out["llama_cpp"]["same_tokens"] = llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.close() if hasattr(llm, "close") else None
    return out


def export(src: str, out: str | None, qtype: str, verify: bool = True) -> dict:
    """A model folder (or a run folder: its final/) -> GGUF; -> a summary with the round-trip check."""
    from stillroom.models.core import load, num_params

    from stillroom.models.core import run_model

    given = Path(src.rstrip("/") or src)
    p = Path(run_model(src))
    if not p.exists():
        raise UserError(f"model not found: {src}")
    # The file goes beside the folder named on the command line, called after it (after the run
    # for a final/ folder): runs/demo -> runs/demo-q8_0.gguf, runs/demo/final -> runs/demo/demo-q8_0.gguf.
    name = given.parent.name if given.name == "final" else given.name
    dest = Path(out) if out else given.parent / f"{name}-{qtype}.gguf"
    if dest.is_dir():
        raise UserError(f"--out {dest} is a folder: give a file name ending in .gguf")
    if dest.suffix != ".gguf":
        raise UserError(f"--out {dest}: the file name must end in .gguf")
    from stillroom.run.outputs import check_writable
    check_writable(dest.parent, "output folder")
    loaded = load(str(p))
    write_gguf(loaded.model, loaded.tokenizer, dest, qtype, name=p.parent.name if p.name == "final" else p.name)
    res = {"file": str(dest), "type": qtype, "bytes": dest.stat().st_size,
           "params": num_params(loaded.model)}
    if verify:
        res["check"] = check(loaded.model, loaded.tokenizer, dest)
        dest.with_name(dest.name + ".check.json").write_text(json.dumps(res, indent=2))
    return res
