"""A CPU-side check of device placement: the code paths a GPU run takes, run with the model on
torch's `meta` device instead of CUDA.

`meta` is the stand-in because it fails where CUDA fails: an op that mixes a CPU tensor with a
meta tensor raises (`Tensor on device cpu is not on the expected device meta`, as CUDA's "found
at least two devices"), a 0-dim CPU scalar is allowed (as on CUDA), and reading a value on the
host (`.item()`, `bool()`, a boolean-mask gather) raises (on a GPU, a synchronisation). PyTorch's
FakeTensorMode accepts `device="cuda"` on a CPU-only build, but its view operations reach the real
CUDA device guard there, so a transformers model cannot run through it.

Neither sees random generators: torch on CUDA refuses a CPU generator for a CUDA tensor, the meta
device does not. `GeneratorPlacement` adds that check (the first command of the quickstart on a
GPU failed exactly so: the masked-LM head fit drew with a CPU generator into CUDA weights).

What this does not see: numerics, kernels and memory of a real GPU, CUDA-only code (fp16's
gradient scaler, CUDA RNG state, nccl), and anything that needs tensor values (the training
loop's one host read per step, evaluation, prediction); bench/gpu_check.sh runs those on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from support import make_config
from routetune.model.methods import METHODS

META = torch.device("meta")


class GeneratorPlacement(TorchFunctionMode):
    """Refuses a random draw whose generator is on another device than the tensor it fills, as
    torch does on CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator):
            target = args[0] if args and torch.is_tensor(args[0]) else None
            device = target.device if target is not None else torch.device(kwargs.get("device") or "cpu")
            if gen.device.type != device.type:
                raise RuntimeError(f"{getattr(func, '__name__', func)}: a {gen.device.type} generator drawing into a "
                                   f"{device.type} tensor (torch refuses this on CUDA)")
        return func(*args, **kwargs)


def _prepare_on_meta(monkeypatch, config_path):
    """routetune's own set-up, with the device resolved to `meta` where a GPU run resolves CUDA."""
    import routetune.training.setup as setup_module
    from routetune.config import load_config
    from routetune.device import Hardware

    monkeypatch.setattr(setup_module, "resolve",
                        lambda *a, **k: Hardware(device=META, precision="fp32", reason="placement check"))
    with GeneratorPlacement():
        return setup_module.prepare(load_config(config_path))


def _train_one_step_of_each_source(setup):
    """Forward and backward of every source's first batch (the training step's own functions:
    micro-batches cut on the CPU copy, moved with to_device, the source's loss, backward)."""
    from routetune.device import to_device
    from routetune.training.weighting import micro_batches

    model = setup.model
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model.train()
    seen = set()
    with GeneratorPlacement():
        for _ in range(12):
            for part in setup.batches.next():
                if part.source in seen or part.stand_in:
                    continue
                seen.add(part.source)
                objective = setup.sources[part.source].objective
                for tensors, _ in micro_batches(part.tensors, objective, 2, model.padding_free):
                    distill = setup.cfg.sources[part.source].distill or None
                    loss = model(part.source, objective, to_device(tensors, META), distill)
                    assert loss.device == META and loss.dim() == 0
                    loss.backward()
            if seen == set(setup.sources):
                break
    assert seen == set(setup.sources)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.device == META for g in grads)


def _peft_config(tmp_path, model_dir, peft, distill=None):
    import yaml

    from support.methods import _config

    path = _config(tmp_path, model_dir, None, peft, {})
    if distill:
        cfg = yaml.safe_load(path.read_text())
        cfg["sources"]["general"]["distill"] = distill
        path.write_text(yaml.safe_dump(cfg))
    return path


PEFT = {"full": {}, "lora": {"r": 4}, "dora": {"r": 4}, "ia3": {}, "bitfit": {}, "adapter": {"adapter_size": 4},
        "prompt_tuning": {"num_virtual_tokens": 3}, "prefix_tuning": {"num_virtual_tokens": 3}}


def test_every_method_is_in_the_placement_table():
    assert set(METHODS) == set(PEFT)  # a new method gets a row here


@pytest.mark.parametrize("distill", [None, 0.5])
@pytest.mark.parametrize("backbone", ["encoder", "decoder"])
@pytest.mark.parametrize("method", sorted(m for m in PEFT if m in METHODS))
def test_training_steps_place_every_tensor_on_the_device(tmp_path, tiny_model_dir, tiny_llama_dir, monkeypatch,
                                                         method, backbone, distill):
    if method == "bitfit" and backbone == "decoder":
        pytest.skip("bitfit needs bias terms; the Llama backbone has none (refused with a config error)")
    model_dir = tiny_model_dir if backbone == "encoder" else tiny_llama_dir
    setup = _prepare_on_meta(monkeypatch, _peft_config(tmp_path, model_dir, {"method": method, **PEFT[method]},
                                                       distill))
    _train_one_step_of_each_source(setup)


def test_token_classification_and_masked_lm_on_the_device(tmp_path, tiny_model_dir, ner_files, monkeypatch):
    setup = _prepare_on_meta(monkeypatch, make_config(tmp_path, tiny_model_dir, ner_files,
                                                      **{"train.grad_accum": 2}))
    _train_one_step_of_each_source(setup)


def test_the_masked_lm_head_is_reset_where_the_model_is(tmp_path, tiny_model_dir, ner_files, monkeypatch):
    """The retention head fit re-initialises the LM head of the model already on the device."""
    from routetune.evaluate.retention import reset_head

    setup = _prepare_on_meta(monkeypatch, make_config(tmp_path, tiny_model_dir, ner_files))
    with GeneratorPlacement():
        reset_head(setup.model.lm, seed=3)
    assert {p.device.type for p in setup.model.lm.parameters()} == {"meta"}


def test_the_generator_check_fails_on_the_old_draw():
    """The draw the quickstart crashed on: a CPU generator into a tensor on the device."""
    weight = torch.empty(4, 4, device=META)
    with GeneratorPlacement(), pytest.raises(RuntimeError, match="cpu generator drawing into a meta tensor"):
        weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))


def test_seeded_initialisation_is_the_same_for_every_device_and_dtype():
    from routetune.model import init

    a = init.normal_(torch.empty(5, 3), 0.02, torch.Generator().manual_seed(7))
    b = init.normal_(torch.empty(5, 3, dtype=torch.bfloat16), 0.02, torch.Generator().manual_seed(7))
    ref = torch.empty(5, 3).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, ref) and torch.equal(b, ref.to(torch.bfloat16))
    with GeneratorPlacement():
        init.normal_(torch.empty(5, 3, device=META), 0.02, torch.Generator().manual_seed(7))


@pytest.mark.parametrize("device, cuda, override, expected", [
    ("cpu", True, None, "gloo"),  # CPU data-parallel on a GPU machine
    ("auto", True, None, "nccl"),
    ("cuda", True, None, "nccl"),
    ("cuda:1", True, None, "nccl"),
    ("auto", False, None, "gloo"),
    ("cpu", False, None, "gloo"),
    ("cuda", True, "gloo", "gloo"),
])
def test_the_data_parallel_backend_follows_the_run_s_device(device, cuda, override, expected):
    from routetune.training.distributed import backend_for

    assert backend_for(device, cuda, override) == expected


def test_reloaded_models_choose_attention_for_their_device_and_config(tmp_path, tiny_llama_dir):
    """A decoder reloaded for the CPU gets eager attention under `auto`, for a GPU SDPA, and a run's
    `model.attention` is kept, whatever the machine has."""
    from routetune.model.routed import RoutedModel, build_model

    folder = tmp_path / "ck"
    model = build_model(str(tiny_llama_dir), seed=0)
    model.save(folder)
    assert RoutedModel.load(folder, "auto", "cpu").config._attn_implementation == "eager"
    assert RoutedModel.load(folder, "auto", "cuda").config._attn_implementation == "sdpa"
    assert RoutedModel.load(folder, "sdpa", "cpu").config._attn_implementation == "sdpa"


def test_the_embedding_gradient_buffer_is_refused_with_data_parallel_training(tmp_path, tiny_model_dir, ner_files):
    """It writes the embedding gradient outside DistributedDataParallel's reducer: refused before
    anything is built, naming the key."""
    from routetune.config import load_config
    from routetune.errors import ConfigError
    from routetune.training.distributed import World
    from routetune.training.setup import prepare

    cfg = load_config(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.embedding_grad_buffer": True}))
    with pytest.raises(ConfigError, match="train.embedding_grad_buffer: not with data-parallel training"):
        prepare(cfg, world=World(rank=0, size=2, local_rank=0, backend="gloo"))


@pytest.mark.parametrize("setting, torchrun, buffered", [("auto", False, True), ("auto", True, False),
                                                         (False, False, False)])
def test_the_embedding_gradient_buffer_auto(tmp_path, tiny_model_dir, ner_files, setting, torchrun, buffered):
    """`auto` keeps the input embedding's gradient in one buffer for one process on the CPU (where
    a fresh one is page-faulted in every step), and leaves torch's embedding under data-parallel
    training, where the buffer would bypass the reducer; false leaves it everywhere."""
    from routetune.config import load_config
    from routetune.model.embedding_grad import BufferedGradEmbedding
    from routetune.training.distributed import World
    from routetune.training.setup import prepare

    cfg = load_config(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.embedding_grad_buffer": setting}))
    setup = prepare(cfg, world=World(rank=0, size=2, local_rank=0, backend="gloo") if torchrun else World())
    assert (type(setup.model.lm.get_input_embeddings()) is BufferedGradEmbedding) is buffered
