"""The run config: one pydantic model per section, with cross-checks between sections.

The models are the single source of truth for keys, types, defaults and the documentation of
each key (attribute docstrings, rendered into docs/configuration.md by config/docs.py).
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from routetune import objectives
from routetune.config.base import Strict
from routetune.config.routing import RoutingConfig, check_routing
from routetune.config.sources import EvalTextConfig, SourceConfig
from routetune.errors import ConfigError

# how a device and a precision are spelled (config keys and --device / --precision); what they
# mean on this machine is device.py's
DEVICES = r"auto|cpu|cuda(:\d+)?"
Precision = Literal["auto", "fp32", "bf16", "fp16"]


def check_device(spec: str, key: str) -> str:
    if not re.fullmatch(DEVICES, spec or ""):
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def check_precision(precision: str, key: str) -> str:
    if precision not in get_args(Precision):
        raise ConfigError(f"{key}: expected one of {', '.join(get_args(Precision))}, got {precision!r}")
    return precision


class RunConfig(Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
    """Run folder name under `output_dir`: one folder name (letters, digits, `.`, `_`, `-`, not starting with `.`; no
    `/`). Default: `<config file stem>-<YYYYmmdd-HHMMSS>`."""
    output_dir: str = "runs"
    """Folder that holds run folders (relative to the working directory); set it to write runs elsewhere."""


class ModelConfig(Strict):
    name: str
    """Hub id, local folder (relative to the config file), or offline alias (`minilm-l6`, `smollm2-135m`)."""
    max_length: int = Field(128, ge=8)
    """Maximum tokens per example, special tokens included. Longer sentences are truncated (and counted)."""
    init_from: str | None = None
    """An earlier run folder (relative to the working directory): start from its best checkpoint, i.e. its backbone, LM
    head, and the task heads of sources with the same name."""
    attention: Literal["auto", "eager", "sdpa"] = "auto"
    """Attention kernel. `auto`: eager (matmul) attention for decoders on CPU, where PyTorch's flash-attention backward
    is slow at short lengths; SDPA otherwise. Same results either way."""
    allow_new_labels: bool = False
    """With `init_from`: when a source's training data has labels its earlier head lacks, append them (old classes keep
    their weights exactly) instead of refusing."""
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"
    """Hold the base model quantized (QLoRA), through bitsandbytes (`pip install 'routetune[quantize]'`; x86 CPUs with
    AVX2, and CUDA GPUs): `nf4` or `fp4` (4-bit, computed in the training precision) or `int8` (LLM.int8). With
    `peft.method` lora or dora: the adapters (and task heads) train in fp32 over the frozen quantized base, checkpoints
    hold only them with these settings, and eval, predict, serve and resume quantize the base again. Slow on a CPU
    (every matmul dequantizes its weight)."""
    quantize_double: bool = False
    """With nf4/fp4: also quantize the quantization constants (double quantization, ~0.4 bits per parameter less)."""
    base_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision the weights are held in while training. `auto`: a base that a parameter-efficient method freezes (LoRA,
    IA3, prompt/prefix tuning, bottleneck adapters) is held once in the training precision (bf16/fp16), what trains
    (adapters, heads, virtual tokens) and its optimizer state in fp32; full fine-tuning, DoRA and BitFit keep fp32.
    `fp32`: always fp32. `bf16` (with bf16 training): every weight, gradient and AdamW state in bf16 (8 bytes per
    trained parameter, not 16); updates below bf16's resolution are lost (-5 points accuracy at lr 5e-5: results.md)."""


class EarlyStoppingConfig(Strict):
    metric: str | None = None
    """Dev metric `<source>/<name>`, e.g. `wnut17/f1`. Default: the primary source's main metric (f1, accuracy or
    perplexity)."""
    mode: Literal["max", "min"] | None = None
    """Whether larger or smaller values of `metric` are better. Default: min for perplexity and losses, else max."""
    patience: int | None = Field(None, ge=1)
    """Evaluations without improvement before stopping; null disables early stopping."""
    min_delta: float = Field(0.0, ge=0.0)
    """Smallest change that counts as an improvement."""


class DistributedConfig(Strict):
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (`--nproc N` or torchrun): `ddp` keeps a full copy of the model, its gradients and
    optimizer state on every process (DistributedDataParallel); `fsdp` shards them over the processes (PyTorch's
    FSDP2, each transformer block a shard group), for models whose training state does not fit one process
    (docs/distributed.md). Checkpoints resume on any number of processes either way."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered weights after its forward and gather them again for backward (less memory,
    one more all-gather per block); false keeps them until backward."""
    offload: bool = False
    """fsdp on GPUs: keep the parameter shards, their gradients and the optimizer state in CPU memory between uses
    (the optimizer step runs on the CPU)."""
    checkpoint: Literal["sharded", "gathered"] = "sharded"
    """fsdp: step checkpoints written by every process, each its shards (torch.distributed.checkpoint), or gathered
    to rank 0 as one process writes them. The last step's checkpoint, `best` and exports are always gathered."""


class TrainConfig(Strict):
    epochs: float = Field(3.0, gt=0)
    """Passes over the primary source."""
    max_steps: int | None = Field(None, ge=1)
    """Hard cap on optimizer steps (wins over `epochs`)."""
    batch_size: int = Field(16, ge=1)
    """Examples per optimizer step (each batch from one source, or mixed with granularity `example`)."""
    grad_accum: int = Field(1, ge=1)
    """Split each step's batch into this many micro-batches, run one after another with their gradients added up (less
    memory; the same update: each micro-batch's loss is weighted by its share of the batch's scored tokens/examples)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """`adamw` (torch AdamW, fused kernel) or `sgd` (with `momentum`)."""
    momentum: float = Field(0.0, ge=0, lt=1)
    """SGD momentum (ignored by AdamW)."""
    fused: bool = True
    """Use PyTorch's fused AdamW kernel (one pass over all parameters; faster steps, measured in docs/benchmarks.md).
    false: the per-tensor loop."""
    group_by_length: bool = False
    """Serve sized sources in a length-grouped order (mega-batches of 50 batches sorted by length, batches shuffled):
    less padding, so faster steps (docs/benchmarks.md), same examples per epoch. Off by default: it can lower the dev
    score (docs/results.md, quality parity), so the random order is the safe default."""
    bf16_frozen_weights: bool = True
    """When training in bf16: hold frozen Linear weights (e.g. the base model under LoRA) as bf16 copies while training,
    instead of autocast re-casting them at every call. Same matmul operands; fp32 originals are what checkpoints save.
    """
    fast_dropout: bool = True
    """Dropout masks from 16-bit slices of 64-bit random words (keep probability quantised to 1/65536) instead of
    torch's per-element Bernoulli draws, which are slow on CPU; also for attention-probability dropout of SDPA models (a
    registered attention function, model/attention.py). false: torch's dropout."""
    fused_lm_loss: bool = True
    """Causal-LM loss computed chunk by chunk from the hidden states (model/lm_loss.py) instead of transformers' full
    fp32 vocabulary logits: same loss and gradients up to rounding, less memory, faster on CPU. Used for decoders whose
    logits are the plain LM head of the last hidden state (Llama, Mistral, Qwen2/3, GPT-2, GPT-NeoX, Phi-3, SmolLM3,
    OLMo-2, StarCoder2, StableLM); others keep transformers' loss."""
    padding_free: bool = True
    """Run the backbone on each batch's real tokens only: the examples packed into one row with their own position ids,
    attention kept within each example (model/packing.py). Same losses and logits as the padded batch up to rounding,
    faster wherever a batch holds examples of different lengths. Checked for BERT, Llama, Mistral (without a sliding
    window), Qwen2/3; other models, prompt or prefix tuning and self-distilled sources train padded (said once)."""
    packed_attention: Literal["padded", "per_example", "flex"] = "padded"
    """Attention in a padding-free batch: `padded` (the padded width, its masks), `per_example` (each example alone,
    a call per example and layer; not with `train.compile`), `flex` (FlexAttention on the packed row; CUDA only)."""
    compile: bool | Literal["auto"] = "auto"
    """Compile each transformer block of the training forward and backward with `torch.compile` (regional
    compilation: one graph serves every block of a kind; parameter names and checkpoints are unchanged). The log says
    how many graphs were compiled, why each recompilation happened and how long compiling took (kept apart from the
    training time); a compilation that fails falls back to eager training with one log line. `auto`: what was measured
    faster on the device (docs/benchmarks.md): eager on the CPU; eager on GPUs until measured there. true / false:
    always / never."""
    compile_backend: str = "inductor"
    """The `torch.compile` backend (`inductor`; `aot_eager` traces without generating kernels, for debugging)."""
    embedding_grad_buffer: bool | Literal["auto"] = "auto"
    """While the input embeddings train: their gradient in one buffer kept across steps, not a fresh vocabulary x hidden
    zero tensor each step (47 MB for minilm-l6, page-faulted in anew each step on the CPU). Same values as torch's.
    `auto`: on for one process on the CPU, where whole steps were 6-16% faster (docs/benchmarks.md); off on CUDA (its
    caching allocator reuses memory) and under data-parallel training, where true is refused (the gradient is
    written outside DistributedDataParallel's reducer)."""
    lr: float = Field(5e-5, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.01, ge=0)
    """Weight decay (decoupled for AdamW; not applied to biases and LayerNorm weights)."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Share of steps with a linear warm-up from 0 to `lr`, before the `schedule`."""
    distributed: DistributedConfig = DistributedConfig()
    """How several processes share the model (ignored in one process)."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass instead of keeping them (transformers' gradient
    checkpointing, non-reentrant): less memory for longer sequences or larger batches, about a third more compute. Same
    gradients."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning rate after the warm-up: `linear` decay to 0, `cosine` decay to 0 (half a cosine), or `constant`
    (transformers' schedules of the same names)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping norm; null disables clipping."""
    device: str = Field("auto", pattern=rf"^({DEVICES})$")
    """`auto` (a CUDA GPU when PyTorch sees one, else the CPU), `cpu`, `cuda` or `cuda:N`. Model, heads, batches and
    optimizer state live there; checkpoints are device-independent (a run trained on a GPU resumes, evaluates and serves
    on a CPU)."""
    precision: Precision = "auto"
    """`auto`: bf16 autocast on GPUs that support it, fp16 with a gradient scaler on older GPUs, bf16 on CPUs with
    native bf16 (AMX or AVX512-BF16), fp32 on other CPUs (where bf16 is emulated and several times slower). The choice
    and its reason are logged and written to the run's hardware.json. bf16/fp16 autocast keeps the weights in fp32."""
    seed: int = 42
    """Seed for head initialisation, dropout and masking."""
    deterministic: bool = False
    """Deterministic kernels (torch's `use_deterministic_algorithms`, cuDNN's deterministic mode,
    `CUBLAS_WORKSPACE_CONFIG`). On a GPU a resumed run then ends bitwise equal to an uninterrupted one; without it the
    plan and all state resume exactly, and the weights to rounding (SDPA and some backward kernels sum in no fixed
    order). Slower on a GPU; a kernel without a deterministic version stops the run with torch's error naming it. CPU
    training is deterministic either way."""
    primary: str | None = None
    """Source whose passes count as epochs and whose metric selects `best`. Default: the first labelled source, else the
    first source."""
    eval_every_steps: int | None = Field(None, ge=1)
    """Evaluate on dev every N steps (in addition to `eval_each_epoch`)."""
    eval_each_epoch: bool = True
    """Evaluate on dev at the end of each pass over the primary source."""
    eval_batch_size: int = Field(64, ge=1)
    """Examples per batch at evaluation and prediction."""
    log_every: int = Field(10, ge=1)
    """Steps between `train` events in metrics.jsonl."""
    eval_before: bool = True
    """Score the language-modelling test sets and `evals` with the untouched base model before training (summary.json
    `before`)."""
    log_plan: bool = True
    """Write plan.jsonl: the source and example ids of every step (an audit trail of the routing)."""
    save_every_steps: int | None = Field(None, ge=1)
    """Write a full resumable checkpoint every N steps (one is always written after the first step, at each dev
    evaluation and at the end)."""
    save_every_minutes: float | None = Field(10.0, gt=0)
    """Also write one when this many minutes have passed since the last (bounds the work a kill can cost); null: by
    steps only."""
    keep_last: int = Field(2, ge=1)
    """Step checkpoints kept (the newest N); `best` is kept besides them."""
    nonfinite: Literal["abort", "skip"] = "abort"
    """On a NaN/inf loss: `abort` (stop, naming step and source; no checkpoint after the bad step) or `skip` it."""
    max_skipped: int = Field(10, ge=1)
    """With nonfinite=skip: abort after this many consecutive skipped steps."""
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    """Early stopping on a dev metric."""
    progress: bool = True
    """Show a progress bar."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_none(cls, value):
        """`report_to: tensorboard` (one name) and `none`, as the Trainer's `report_to` takes them."""
        if value == "none":
            return []
        return [value] if isinstance(value, str) else value

    report_to: list[Literal["tensorboard", "mlflow", "trackio", "wandb"]] = Field(default_factory=list)
    """Experiment trackers (a list, or one name; `none`: no tracker) that receive the run's metrics as they are logged:
    `tensorboard` (event files in RUN/tensorboard), `mlflow` (MLFLOW_TRACKING_URI, else SQLite in RUN/mlflow.db),
    `trackio` (local, $TRACKIO_DIR) and `wandb` (Weights & Biases, $WANDB_PROJECT). The first three come with `pip
    install 'routetune[tracking]'`, W&B with `pip install wandb`."""


class PeftConfig(Strict):
    @field_validator("method", mode="before")
    @classmethod
    def _none_is_full(cls, value):
        """`none` (no parameter-efficient method) is another name for `full`."""
        return "full" if value == "none" else value

    method: str = Field("full", json_schema_extra={"registry": "methods"})
    """Parameter-efficient method: `lora`, `dora` (weight-decomposed LoRA), `ia3`, `prompt_tuning` (trained
    virtual-token embeddings before the input) and `prefix_tuning` (trained virtual keys/values in every layer) come
    from the peft library; `adapter` is routetune's bottleneck adapter; `bitfit` trains only bias terms; `full` (also
    written `none`) is full fine-tuning (see `freeze`)."""
    r: int = Field(8, ge=1)
    """LoRA / DoRA rank."""
    alpha: float = Field(16, gt=0)
    """LoRA / DoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA / DoRA input."""
    num_virtual_tokens: int = Field(20, ge=1)
    """Virtual tokens of `prompt_tuning` / `prefix_tuning`."""
    seed: int = 0
    """Seed of the virtual-token initialisation (prompt tuning starts from the embeddings of random vocabulary tokens).
    """
    adapter_size: int = Field(64, ge=1)
    """Bottleneck width of `adapter`."""
    adapter_placement: list[Literal["attention", "ffn"]] = Field(default_factory=lambda: ["attention", "ffn"])
    """Where `adapter` goes: after the attention and feed-forward output projections (Houlsby) or `[ffn]` only
    (Pfeiffer)."""
    train_lm_head: bool = False
    """Train the vocabulary projection (the LM head's output matrix) too, as peft's `modules_to_save` does. By default
    a parameter-efficient method leaves it frozen: on a decoder whose output matrix is not tied to the embeddings
    (Llama-3, Mistral, Qwen2.5-7B, Phi-3) it is the whole vocabulary x hidden matrix. The LM head's other parts (BERT's
    transform and output bias) train either way."""
    target_modules: list[str] | None = None
    """Module names (suffixes) that get adapters. Default: peft's own default for the architecture (LoRA/DoRA: the
    attention's query and value projections, e.g. Llama's q_proj, v_proj, BERT's query, value, GPT-2's c_attn; IA3
    adds the feed-forward output), and where peft has none (e.g. DistilBERT, Phi-3) every linear layer but the output
    projection for LoRA/DoRA (peft's `all-linear`); IA3 then needs the modules named."""


class FreezeConfig(Strict):
    embeddings: bool = False
    """Freeze the word (and position) embeddings; a decoder matrix tied to them freezes too."""
    top_k_layers: int | None = Field(None, ge=1)
    """Train only the top k transformer layers of the backbone (plus the heads)."""
    head_only: bool = False
    """Train only the task heads and the LM head's own parameters; the backbone is frozen."""


class RetentionConfig(Strict):
    score: bool = True
    """Score general text (the `evals` sets and the language-modelling test sets) with the base model before training
    and with the fine-tuned one after (summary.json `before_after`). `false` (what `train --no-retention` sets) skips
    both, with their masked-LM head fits; a retention budget still measures its `evals` set during training, since
    that measurement is training input, not a before/after score."""
    cache_before: bool = True
    """Reuse base-model scores from `~/.cache/routetune/before` when the model files, the evaluation text and every
    scoring setting are the same (a sweep scores its base once)."""
    fit_head: Literal["auto", "always", "never"] = "auto"
    """Fit a masked-LM head before scoring masked-LM retention. `auto`: when the base checkpoint is an encoder without
    MLM-head weights (its head would be random). The same seeded recipe runs on the base and the fine-tuned backbone
    (backbone frozen)."""
    fit_text: str | None = None
    """Text the head is fitted on (file, folder or glob). Default: the training text of the first masked-LM source."""
    fit_strip_gutenberg: bool = False
    """Drop Project Gutenberg headers from `fit_text` (a source's own setting is used when the text comes from a
    source)."""
    fit_steps: int = Field(200, ge=1)
    """Optimizer steps of the head fit."""
    fit_batch_size: int = Field(16, ge=1)
    """Blocks per fit step."""
    fit_lr: float = Field(1e-3, gt=0)
    """AdamW learning rate of the head fit."""
    fit_blocks: int = Field(2000, ge=1)
    """Blocks read from `fit_text` (the fit samples from them)."""
    seed: int = 0
    """Seed of the head initialisation, sampling and masking of the fit."""


class Config(Strict):
    model: ModelConfig
    """The pretrained backbone."""
    sources: dict[str, SourceConfig]
    """Named sources; order matters only for the default primary source."""
    routing: RoutingConfig = RoutingConfig()
    """How the router chooses a source for each batch."""
    train: TrainConfig = TrainConfig()
    """Optimisation, evaluation and stopping."""
    run: RunConfig = RunConfig()
    """Where the run folder goes."""
    peft: PeftConfig = PeftConfig()
    """Parameter-efficient fine-tuning method of the shared backbone."""
    freeze: FreezeConfig = FreezeConfig()
    """Freezing strategies for full fine-tuning (peft.method full)."""
    evals: dict[str, EvalTextConfig] = Field(default_factory=dict)
    """Extra held-out text, never trained on, scored with the base model before training and with the fine-tuned model
    after (e.g. general text, to see what was kept)."""
    retention: RetentionConfig = RetentionConfig()
    """How base and fine-tuned models are compared on held-out text."""

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        _check_source_names(self)
        _check_freeze(self)
        check_routing(self.routing, list(self.sources), self.sources)
        _resolve_primary(self)
        _check_budget_targets(self)
        if self.train.compile is True and self.train.packed_attention == "per_example":  # a graph per batch's lengths
            raise ValueError("train.packed_attention=per_example: not with train.compile=true (padded to compile)")
        return self


def _check_source_names(cfg: Config) -> None:
    if not cfg.sources:
        raise ValueError("sources: at least one source is required")
    for name in [*cfg.sources, *cfg.evals]:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ValueError(f"{'sources' if name in cfg.sources else 'evals'}.{name}: names may hold "
                             "letters, digits, '_' and '-' only")
    for name in cfg.evals:
        if name in cfg.sources:
            raise ValueError(f"evals.{name}: a source has this name already")


def _check_freeze(cfg: Config) -> None:
    f = cfg.freeze  # whether the method allows freezing strategies is its own to say (Method.check_options)
    if f.head_only and f.top_k_layers:
        raise ValueError("freeze: give head_only or top_k_layers, not both")


def _resolve_primary(cfg: Config) -> None:
    """The primary source (epochs count its batches) and the default early-stopping metric:
    the primary's headline metric (objectives.py)."""
    names, r = list(cfg.sources), cfg.routing
    labelled = [n for n, sc in cfg.sources.items() if sc.supervised]
    primary = cfg.train.primary or (labelled or names)[0]
    if primary not in cfg.sources:
        raise ValueError(f"train.primary: no source named {primary!r}")
    if r.weights is not None and r.weights[primary] <= 0 and r.schedule is None and cfg.train.max_steps is None:
        raise ValueError(
            f"routing.weights.{primary}: the primary source has weight 0, so its epochs never end; "
            "give it a weight > 0 or set train.max_steps"
        )
    object.__setattr__(cfg.train, "primary", primary)
    es = cfg.train.early_stopping
    if es.metric is None:
        object.__setattr__(es, "metric", f"{primary}/{objectives.get(cfg.sources[primary].objective).headline}")
    if es.mode is None:
        object.__setattr__(es, "mode", "min" if objectives.lower_is_better(es.metric) else "max")


def _check_budget_targets(cfg: Config) -> None:
    """A retention budget's measure is dev text (a test set never steers training) and its controlled
    sources leave the primary source out."""
    b = cfg.routing.budget
    if b is None:
        return
    primary = cfg.train.primary
    if b.sources is None:
        object.__setattr__(b, "sources", [n for n in cfg.sources if n != primary])
    if primary in b.sources or not b.sources:
        raise ValueError(f"routing.budget.sources: the primary source {primary!r} cannot be a controlled general "
                         "source; name the general sources (at least one besides the primary)")
    name = b.measure
    if name in cfg.evals:
        if cfg.evals[name].split != "dev":
            raise ValueError(f"routing.budget.measure: evals.{name} has split {cfg.evals[name].split}; a budget "
                             f"is measured on dev text (set evals.{name}.split: dev), so that test text never "
                             "steers training")
    elif name in cfg.sources:
        sc = cfg.sources[name]
        if sc.objective not in objectives.names(lm_only=True) or not sc.has_split("dev"):
            raise ValueError(f"routing.budget.measure: source {name!r} has no language-modelling dev text (give "
                             f"it holdout.dev or a dev file, or name an evals set with split: dev)")
    else:
        raise ValueError(f"routing.budget.measure: no evals set or source named {name!r} (evals: "
                         f"{', '.join(cfg.evals) or 'none'})")

