"""At most one host synchronisation per optimizer step in the training loop, counted on the CPU.

On a GPU every read of a device tensor's value by the host (`.item()`, `bool(t)`, `.tolist()`,
a boolean-mask gather, whose size the host must learn) waits for the queued kernels to finish; at
these model sizes the GPU is bound by launches, so each such wait costs throughput. A CPU shows
none of that, so the test marks what would live on the device: every tensor the engine moves
"to the device" becomes an `OnDevice` tensor, and so does everything computed from it (activations,
losses), through `__torch_function__`. Each call that reads such a tensor's value on the host is
counted. Parameters and the loop's own host-side counts are ordinary tensors and are not.

What this cannot see: syncs inside autograd's backward kernels and the optimizer (they do not pass
through `__torch_function__`), and the data-parallel all-reduces (one process here). A GPU's own
check is `torch.cuda.set_sync_debug_mode("warn")`, which bench/gpu_check.sh runs.
"""

from __future__ import annotations

import pytest
import torch

from support import make_config

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
         torch.Tensor.masked_select, torch.masked_select}


class OnDevice(torch.Tensor):
    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_mask = func is torch.Tensor.__getitem__ and any(
            torch.is_tensor(i) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if func in READS or bool_mask:
            import traceback

            frame = traceback.extract_stack(limit=2)[0]
            cls.reads.append(f"{getattr(func, '__name__', func)} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")
        return super().__torch_function__(func, types, args, kwargs)


def _mark(tensors: dict, device) -> dict:
    return {k: v.as_subclass(OnDevice) if torch.is_tensor(v) else v for k, v in tensors.items()}


def _count(monkeypatch, config_path) -> list[list[str]]:
    """Train a few steps; the host reads of device tensors inside each train_step."""
    import routetune.training.engine as engine
    from routetune.workflow import train

    per_step: list[list[str]] = []
    real = engine.Trainer.train_step

    def counted(self, step, parts):
        OnDevice.reads = []
        out = real(self, step, parts)
        per_step.append(list(OnDevice.reads))
        return out

    import routetune.model.lm_loss as lm_loss

    monkeypatch.setattr(engine, "to_device", _mark)
    monkeypatch.setattr(lm_loss, "sync_free", lambda device: True)  # the choices made on a GPU
    monkeypatch.setattr(engine.Trainer, "train_step", counted)
    train(config_path, run_test=False)
    return per_step


def _peft_config(tmp_path, model_dir, peft, distill=None):
    import yaml

    from support.methods import _config

    path = _config(tmp_path, model_dir, None, peft, {}, max_steps=4, fused=True, max_grad_norm=1.0)
    cfg = yaml.safe_load(path.read_text())
    if distill:
        cfg["sources"]["general"]["distill"] = distill
    path.write_text(yaml.safe_dump(cfg))
    return path


CASES = {
    "encoder-ner-mlm": lambda tmp, bert, llama, files: make_config(
        tmp, bert, files, **{"train.max_steps": 4, "train.grad_accum": 2, "train.max_grad_norm": 1.0}),
    "decoder-lora-clm": lambda tmp, bert, llama, files: _peft_config(tmp, llama, {"method": "lora", "r": 4}),
    "decoder-prompt-clm": lambda tmp, bert, llama, files: _peft_config(
        tmp, llama, {"method": "prompt_tuning", "num_virtual_tokens": 3}),
    "decoder-full-distill": lambda tmp, bert, llama, files: _peft_config(tmp, llama, {"method": "none"}, 0.5),
    "encoder-lora-distill": lambda tmp, bert, llama, files: _peft_config(tmp, bert, {"method": "lora", "r": 4}, 0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_host_sync_per_step(tmp_path, tiny_model_dir, tiny_llama_dir, ner_files, monkeypatch, case):
    path = CASES[case](tmp_path, tiny_model_dir, tiny_llama_dir, ner_files)
    per_step = _count(monkeypatch, path)
    assert len(per_step) >= 3
    for reads in per_step:
        assert len(reads) <= 1, reads  # the step's losses, read back once (the non-finite check)
    assert any(reads for reads in per_step)  # the counting sees the one read (the test can fail)


def test_the_sync_free_underflow_path_equals_the_exact_one(monkeypatch):
    """The GPU's branch-free form of the chunked loss's underflow path gives the exact path's
    loss and gradients, on rows whose target probability underflows and on ordinary rows."""
    import routetune.model.lm_loss as lm_loss

    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    with torch.no_grad():
        weight[7] = -40 * weight[3]  # token 7's logit far below the max where token 3's is high
        hidden[:3] = 30 * weight[3] / weight[3].norm()
    targets = torch.tensor([7, 7, 3, 1, 2, 7])
    out = {}
    for free in (False, True):
        monkeypatch.setattr(lm_loss, "sync_free", lambda device, free=free: free)
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss = lm_loss.linear_cross_entropy(h, w, targets)
        loss.backward()
        out[free] = (loss.detach(), h.grad, w.grad)
    assert torch.isfinite(out[True][0]) and out[False][0] > 100  # the underflowing rows are there
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_counter_sees_a_boolean_mask_gather_and_an_item():
    OnDevice.reads = []
    x = torch.arange(6.0).as_subclass(OnDevice)
    x[x > 2].sum().item()
    assert len(OnDevice.reads) == 2
