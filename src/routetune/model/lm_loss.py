"""Cross-entropy over a large vocabulary without materialising the full logits.

The causal-LM loss of transformers projects every position onto the vocabulary, upcasts the
logits to fp32 and runs log-softmax + NLL on them: for smollm2-135m at 8 x 128 tokens that is a
1,024 x 49,152 fp32 tensor (200 MB) written, read back by log-softmax, written again, and read
twice more by the backward pass; on the 2-core machine log-softmax forward + backward alone was
~340 ms of a ~3 s LoRA step (docs/benchmarks.md). Here the projection and the loss run in
chunks of rows small enough to stay cache-friendly, and because the loss is the end of the graph
its gradient with respect to the hidden states (and, when it trains, the head weight) is computed
in the same pass: backward only scales the stored gradient by the incoming one.

Numerics follow transformers' path under bf16 autocast: logits from a matmul in the autocast
dtype, an fp32 softmax of them (the loss is -log p[target], with an exact log-sum-exp for rows
where p[target] underflows), the mean over scored rows, and the logit gradient (softmax - one-hot,
in fp32) cast to the matmul dtype before the backward matmuls. What differs is rounding: losses
are summed chunk by chunk, the mean's 1/n scales the gradient after the backward matmul (in fp32)
rather than the logit gradient before its cast, and a trained head's weight gradient is
accumulated in fp32 across chunks.

Written here rather than taken from a library: the fused kernels that do this (Liger Kernel,
Apple's cut-cross-entropy) are Triton/CUDA only.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

# rows per chunk are chosen so one chunk's fp32 probabilities hold about this many elements
# (128 MB; 682 rows of a 49k vocabulary): chunks of 4M elements were slower than one piece,
# because the vocabulary matmuls lose efficiency on few rows
CHUNK_ELEMENTS = 1 << 25


def _rows_per_chunk(vocab: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(1, vocab))


SCORED_INDEX = "scored_index"  # batch key: (row, position) of each scored LM token, computed on the CPU


def scored_positions(objective: str, labels: torch.Tensor) -> torch.Tensor | None:
    """(row, position) pairs of the tokens an LM objective scores (masked positions; for causal
    LM the shifted targets that are not -100), computed where the labels are (the CPU, before the
    batch moves): a boolean-mask gather on the device (`x[mask]`) needs the host to learn how
    many rows it yields, a stall of the GPU's queue, while these pairs index without one."""
    if objective == "masked-lm":
        return (labels != -100).nonzero()
    if objective == "causal-lm":
        return (labels[:, 1:] != -100).nonzero()
    return None


def pick_scored(x: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | None, offset: int = 0) -> torch.Tensor:
    """``x[mask]`` (mask over x's first two dimensions): with `index` (from :func:`scored_positions`,
    positions shifted by `offset`), the same rows in the same order, gathered without a host sync."""
    if index is None:
        return x[mask]
    return x[index[:, 0], index[:, 1] + offset]


def sync_free(device: torch.device) -> bool:
    """Whether to avoid reading tensor values on the host, at some cost in arithmetic (everywhere
    but the CPU, where such a read waits for nothing)."""
    return device.type != "cpu"


def _underflow_exact(nll, logits, p, p_t, rows, t):
    """Where p[target] underflows (target logit > ~70 below the max), -log p is inf: take the
    exact log-sum-exp path for those rows. On the CPU only the rows that need it are recomputed
    (asking whether any does costs nothing there); on a GPU that question would stall the queue
    for the host, so every row gets the sync-free form lse = max + log(1 / p_max), read from the
    softmax already computed, and `where` keeps it only for the underflowed rows."""
    tiny = p_t < 1e-30
    if not sync_free(logits.device):
        if bool(tiny.any()):
            lse = torch.logsumexp(logits[tiny].float(), dim=-1)
            nll[tiny] = lse - logits[tiny].float()[torch.arange(int(tiny.sum())), t[tiny]]
        return nll
    lse = logits.max(-1).values.float() - torch.log(p.max(-1).values)
    return torch.where(tiny, lse - logits[rows, t].float(), nll)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, want_hidden_grad: bool, want_weight_grad: bool):
        n = hidden.shape[0]
        step = _rows_per_chunk(weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        off = torch.autocast(hidden.device.type, enabled=False) if hidden.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext()
        with off:
            for start in range(0, n, step):
                h = hidden[start : start + step]
                t = targets[start : start + step]
                logits = h @ weight.t()
                # one fused kernel: fp32 softmax of the (bf16) logits, as log_softmax(logits.float())
                # would see them; -log p[target] is the row's loss
                p = torch.softmax(logits, dim=-1, dtype=torch.float32)
                rows = torch.arange(h.shape[0], device=h.device)
                p_t = p[rows, t]
                nll = -torch.log(p_t)
                nll = _underflow_exact(nll, logits, p, p_t, rows, t)
                total += nll.sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d(NLL)/d(logits) = softmax - one_hot (in fp32, so p_t close to 1 keeps its
                # small difference), cast to the matmul dtype as autocast's backward does; the 1/n
                # of the mean is applied to the (small) results instead, in backward()
                p[rows, t] -= 1.0
                g = p.to(hidden.dtype)
                if grad_hidden is not None:
                    torch.mm(g, weight, out=grad_hidden[start : start + step])
                if grad_weight is not None:
                    grad_weight += (g.t() @ h).float()
        ctx.scale = 1.0 / n
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.float() * ctx.scale  # in fp32: a bf16 scale would be off by up to 0.4%
        gh = (grad_hidden.float() * scale).to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = grad_weight * scale if grad_weight is not None else None
        return gh, gw, None, None, None


# bf16 (etc.) copies of frozen head weights, so a head tied to frozen embeddings is cast once,
# not at every step as autocast does for tensors that do not require grad
_CAST_CACHE: dict[int, tuple] = {}


def _cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if weight.dtype == dtype:
        return weight
    if weight.requires_grad and torch.is_grad_enabled():
        return weight.to(dtype)  # differentiable cast: the fp32 weight gets its gradient
    key = id(weight)
    stamp = (weight.data_ptr(), weight._version, dtype)
    hit = _CAST_CACHE.get(key)
    if hit is not None and hit[0] == stamp and hit[1]() is weight:
        return hit[2]
    cast = weight.detach().to(dtype)
    _CAST_CACHE.clear()  # one head at a time; never holds more than one copy
    _CAST_CACHE[key] = (stamp, weakref.ref(weight), cast)
    return cast


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (rows: `hidden`'s, classes: `weight`'s) against
    `targets`, without holding all logits at once. `hidden`: (n, d), `weight`: (vocab, d),
    `targets`: (n,) class ids (no ignored rows: select the scored rows first). Under CPU/CUDA
    autocast the matmuls run in the autocast dtype, as `nn.Linear` would."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match"
        )
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # nothing scored: a zero loss that keeps the graph
    device = hidden.device.type
    autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
    h = hidden.to(dtype)
    w = _cast_weight(weight, dtype)
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, w, targets, grad and h.requires_grad, grad and w.requires_grad)
