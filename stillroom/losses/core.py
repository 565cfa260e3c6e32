"""What every loss here shares: the IGNORE_INDEX and label shift, the sparse (`TopK`) and
linear-head (`Head`) target types, row chunking, and the masking rule for -inf teacher logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23   # logits per chunk when none is given: 32 MB of fp32 per full-size buffer


def auto_chunk_rows(vocab: int, device=None) -> int:
    """Rows per chunk for a vocabulary: a power of two near CHUNK_ELEMENTS / vocab (128 rows at
    49k, 32 at 262k), so the loss's working memory stays the same whatever the vocabulary, and the
    chunks stay thick enough for the head's matmuls (measured: 64 rows at 49k is ~7% slower). On
    CUDA eight times as many rows (1024 at 49k: 256 MB of fp32 per full-size buffer): a chunk's
    matmuls there take microseconds, about what launching its dozen kernels takes, so thin chunks
    would leave the GPU waiting on launches (from that arithmetic; the device check measures it)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    elements, most = (CHUNK_ELEMENTS * 8, 12) if cuda else (CHUNK_ELEMENTS, 10)
    return 1 << max(4, min(most, (elements // max(vocab, 1)).bit_length() - 1))


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) labels -> (B, S) targets where position i holds labels[i + 1]; the last is ignored."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (N, V), a view whenever the leading dims allow it (also after slicing V)."""
    return x.reshape(-1, x.shape[-1])


def _masked_kl_rows(log_q, log_p):
    """KL(p || q) rows with -inf logits masked: 0 where p == 0 (0 log 0), dropped where log q = -inf."""
    p = log_p.exp()
    diff = torch.where((p > 0) & torch.isfinite(log_q), log_p - log_q, 0.0)
    return (p * diff).sum(-1)


def on_support(z, log_p, scale: float = 1.0):
    """log softmax(z * scale) renormalized on the support of p (the tokens p does not mask with
    -inf), -inf elsewhere; z: the student's logits (scale 1/T) or its log-probs (scale 1).

    The one rule for masked teacher tokens on every path (fast, lean, general, every divergence,
    the evaluation): a token the teacher masks is outside its distribution, so the student is
    compared with it on the rest, renormalized there. Rows where p masks nothing are unchanged.
    Made from z directly, so a masked token's gradient is exactly 0 under autograd."""
    return torch.log_softmax(torch.where(torch.isfinite(log_p), z, float("-inf")) * scale, dim=-1)


def support_kl_rows(log_q, log_p):
    """KL(p || q restricted to p's support and renormalized) rows (see `on_support`)."""
    return _masked_kl_rows(on_support(log_q, log_p), log_p)


def _rowdot(a, b):
    """(n, V), (n, V) -> (n,): per-row dot products as one batched matmul (no (n, V) temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _zero_rows(g, keep, drop=None):
    """Zero the gradient rows not kept. drop: whether any row is dropped, known to the caller
    (False: nothing to do; True: one masked pass on the device, no host sync); None asks the
    device and indexes the few dropped rows."""
    if drop is None:
        rows = (~keep).nonzero().view(-1)
        if rows.numel():
            g[rows] = 0.0
    elif drop:
        g.masked_fill_(~keep.unsqueeze(-1), 0.0)
    return g


def _nll_terms(log_q, target, rows, weight, want_grad, consume, drop=None):
    """weight * sum over `rows` of -log_q[target], and its gradient weight * (softmax - onehot).
    consume=True turns log_q into the gradient in place (its last use). drop: whether `rows`
    leaves any out, when the caller knows (see _zero_rows)."""
    nll = -log_q.gather(-1, target).squeeze(-1)
    loss = weight * torch.where(rows, nll, 0.0).sum()
    if not want_grad:
        return loss, None
    g = (log_q.exp_() if consume else log_q.exp()).mul_(weight)
    g.scatter_add_(-1, target, torch.full_like(nll, -weight).unsqueeze(-1))
    return loss, _zero_rows(g, rows, drop)


@dataclass
class TopK:
    """A sparse target distribution: for each position, the k most likely token ids, their
    log-probs (at the loss's temperature), and the log of the mass outside them (-inf: none).

    Rule for the missing mass (a "tail bucket"): the target is compared with the student on k + 1
    outcomes -- each of the k tokens, and "any other token" -- so
        KL = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail),
    with q_tail the student's own mass outside the k ids. Equivalently, the tail mass is spread over
    the other tokens in proportion to the student's own probabilities. Nothing is invented about
    the tail, and with k = V (p_tail = 0) it is exactly the dense KL. A row may hold fewer than k
    entries (an API's top-20, say): pad it with distinct unused ids and log-prob -inf ("no entry").
    """
    ids: torch.Tensor       # (..., k) int64
    logp: torch.Tensor      # (..., k) float
    log_tail: torch.Tensor  # (...)    float

    @property
    def shape(self):
        return self.ids.shape[:-1]

    def rows(self) -> "TopK":
        k = self.ids.shape[-1]
        return TopK(self.ids.reshape(-1, k), self.logp.reshape(-1, k), self.log_tail.reshape(-1))

    def chunk(self, a, b) -> "TopK":
        return TopK(self.ids[a:b], self.logp[a:b], self.log_tail[a:b])

    def select(self, idx) -> "TopK":
        r = self.rows()
        return TopK(r.ids.index_select(0, idx), r.logp.index_select(0, idx), r.log_tail.index_select(0, idx))

    def argmax(self) -> torch.Tensor:
        return self.ids.gather(-1, self.logp.argmax(-1, keepdim=True))


@dataclass
class Head:
    """A target given as final hidden states and the linear head that turns them into logits:
    logits = hidden @ weight.T (+ bias), computed chunk by chunk inside the loss, so the (rows, V)
    logits never exist in full (the teacher's side of the lean path)."""
    hidden: torch.Tensor                 # (..., H)
    weight: torch.Tensor                 # (V, H)
    bias: torch.Tensor | None = None     # (V,)

    @property
    def shape(self):
        return self.hidden.shape[:-1]

    def rows(self) -> "Head":
        return Head(self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.bias)

    def select(self, idx) -> "Head":
        return Head(self.rows().hidden.index_select(0, idx), self.weight, self.bias)

    def chunk(self, a, b) -> torch.Tensor:
        return _linear(self.hidden[a:b], self.weight, self.bias)


def _linear(h, weight, bias):
    return torch.nn.functional.linear(h, weight, bias)


def _target_rows(t):
    return t.rows() if isinstance(t, (TopK, Head)) else _rows(t)


def _target_chunk(t, a, b):
    return t.chunk(a, b) if isinstance(t, (TopK, Head)) else t[a:b]


def topk_targets(logits, k, temperature=1.0, chunk=None) -> TopK:
    """The top-k of softmax(logits / T) as a TopK target, computed chunk by chunk (no (B, S, V)
    fp32 copy). k >= V keeps everything (the tail is empty)."""
    lead, V = logits.shape[:-1], logits.shape[-1]
    k = min(k, V)
    chunk = chunk or auto_chunk_rows(V, logits.device)
    x = _rows(logits.detach())
    ids = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    logp = torch.empty(x.shape[0], k, dtype=torch.float32, device=x.device)
    tail = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    with torch.no_grad():
        for a in range(0, x.shape[0], chunk):
            lp = torch.log_softmax(x[a:a + chunk].float() * (1.0 / temperature), dim=-1)
            v, i = lp.topk(k, dim=-1)
            ids[a:a + chunk], logp[a:a + chunk] = i, v
            tail[a:a + chunk] = torch.logsumexp(lp.scatter_(-1, i, float("-inf")), dim=-1)
    return TopK(ids.view(*lead, k), logp.view(*lead, k), tail.view(lead))


def _saved_grad(ctx, grad_out):
    """The gradient a chunked loss saved in forward, scaled in place (the buffer is ours alone: no
    full-size copy), once."""
    if getattr(ctx, "used", False):
        raise RuntimeError("stillroom losses support one backward per forward (no retain_graph reuse)")
    ctx.used = True
    (grad,) = ctx.saved_tensors
    return grad.mul_(grad_out)
