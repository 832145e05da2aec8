"""Input-embedding gradients accumulated into one buffer kept across steps (``train.embedding_grad_buffer``).

torch's embedding backward allocates a fresh vocabulary x hidden zero tensor every step and
index-adds the batch's rows into it. For minilm-l6 that is 30,522 x 384 floats = 47 MB, above
glibc's largest mmap threshold (32 MB), so each step maps fresh pages and faults all of them in:
`aten::fill_` on that tensor took ~36 ms of a ~300 ms WNUT-17 step (docs/benchmarks.md). Here the
backward writes the same index-add into a buffer the module keeps (zeroed when the optimizer has
dropped the gradient, added into when a step runs several backward passes or a tied head already
wrote its part), and hands it to the parameter as its ``.grad``. Written by hand because torch has
no option to reuse the embedding-gradient storage. On by default for one process on the CPU
(`auto`): the zero-fill drops to ~4-6 ms and whole steps were 6-16% faster in alternating runs on
an Intel Xeon (docs/benchmarks.md); an earlier, noisier comparison on another machine did not show
the gain.

It only applies while training with gradients enabled and a trainable, dense weight; anything else
(frozen embeddings, evaluation, ``max_norm``, ``scale_grad_by_freq``, sparse) is torch's own
embedding. The gradient goes to ``weight.grad`` directly, so ``torch.autograd.grad`` with respect
to the embedding weight is not supported while it is on (routetune does not use it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, module: "BufferedGradEmbedding") -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.module = module
        return F.embedding(ids, weight, module.padding_idx)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        module = ctx.module
        weight = module.weight
        rows = ids.reshape(-1)
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(weight.dtype)
        if module.padding_idx is not None:  # torch leaves the padding row's gradient at zero: add zeros there
            # (a mask, not boolean indexing: no data-dependent shape, so no host sync and it traces on any device)
            grad = grad * (rows != module.padding_idx).unsqueeze(1).to(grad.dtype)
        if weight.grad is None:
            buf = module.grad_buffer
            if buf is None or buf.shape != weight.shape or buf.dtype != weight.dtype:
                buf = module.grad_buffer = torch.empty_like(weight)
            buf.zero_()
            buf.index_add_(0, rows, grad)
            weight.grad = buf
        else:
            weight.grad.index_add_(0, rows, grad)
        return None, None, None


class BufferedGradEmbedding(nn.Embedding):
    grad_buffer: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.weight.requires_grad and torch.is_grad_enabled()) \
                or self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            return super().forward(ids)
        return _Lookup.apply(ids, self.weight, self)


def use_embedding_grad_buffer(model: nn.Module) -> bool:
    """Switch the backbone's input embedding to BufferedGradEmbedding in place (same module and
    parameters, so state dicts are untouched). Returns whether it was switched."""
    emb = model.get_input_embeddings()
    if type(emb) is nn.Embedding:
        emb.__class__ = BufferedGradEmbedding
        return True
    return False
