"""Everything a run needs, built and validated before the first step: tokenizer, backbone + heads,
sources, dev/test sets, router and the exact number of steps."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from routetune import objectives as objective_table
from routetune.config import Config
from routetune.data.build import (
    EvalSet,
    build,
    build_evals,
    resolve_objective,
    source_sizes,
)
from routetune.data.plan import RoutedBatches, plan_run
from routetune.data.sources import LabelledSource, MemorySource
from routetune.seeds import derive_seed
from routetune.data.text import TextStream
from routetune.device import Hardware, resolve
from routetune.errors import ConfigError
from routetune.evaluate.tasks import metric_names
from routetune.model import packing
from routetune.model.attention import attention_dropout, use_fast_attention_dropout, use_packed_attention
from routetune.model.embedding_grad import use_embedding_grad_buffer
from routetune.model.fast_dropout import use_fast_dropout
from routetune.model.routed import RoutedModel, build_model
from routetune.model.load import is_decoder, load_model_config, load_tokenizer, resolve_model
from routetune.model import methods
from routetune.model.quantize import check_quantizable
from routetune.model.trainable import apply_method
from routetune.training.checkpoint import run_checkpoint
from routetune.training.distributed import ALONE, World
from routetune.training.tracking import check_available as check_trackers

log = logging.getLogger("routetune")


@dataclass(frozen=True)
class Setup:
    """Everything a run needs, built and checked by :func:`prepare` and not changed after (the
    model's weights and the batches' position change as it trains; which objects they are does not)."""

    cfg: Config
    model_path: str
    tokenizer: object
    model: RoutedModel
    sources: dict
    objectives: dict[str, str]
    batches: RoutedBatches
    total_steps: int
    primary_batches_per_epoch: int
    hardware: Hardware
    dev: dict[str, EvalSet] = field(default_factory=dict)
    test: dict[str, EvalSet] = field(default_factory=dict)
    source_table: list[dict] = field(default_factory=list)
    evals: dict[str, EvalSet] = field(default_factory=dict)  # the config's `evals` (held-out text)
    world: World = ALONE  # this process's place among data-parallel processes (training/distributed.py)

    @property
    def labels(self) -> dict[str, list[str]]:
        return {n: list(s.labels) for n, s in self.sources.items() if hasattr(s, "labels")}

    def before_sets(self) -> dict[str, EvalSet]:
        """Sets the untouched base model is scored on: language-modelling test sets and `evals` (none
        with `retention.score: false`)."""
        if not self.cfg.retention.score:
            return {}
        return {**{n: s for n, s in self.test.items() if not objective_table.get(self.objectives[n]).supervised},
                **self.evals}


def _check_distributed(cfg: Config, hardware, world: World) -> None:
    """What data-parallel training and FSDP sharding cannot do, refused before any data is read (the
    sharding keys in one process too: the config is the same wherever it runs)."""
    if cfg.train.embedding_grad_buffer is True and world.distributed:
        raise ConfigError("train.embedding_grad_buffer: not with data-parallel training (it writes the embedding "
                          "gradient outside DistributedDataParallel's reducer, so the ranks would not average it); "
                          "set it to false")
    dc = cfg.train.distributed
    if dc.strategy != "fsdp":
        if dc.offload:
            raise ConfigError("train.distributed.offload: only with train.distributed.strategy=fsdp")
        return
    if cfg.model.quantize != "none":  # bitsandbytes' packed 4-/8-bit weights are not DTensor shards
        raise ConfigError(f"train.distributed.strategy=fsdp: not with model.quantize={cfg.model.quantize} (a quantized "
                          "base is already small; use strategy ddp)")
    if hardware.precision == "fp16":
        raise ConfigError("train.distributed.strategy=fsdp: not with fp16 precision (its gradient scaler does not read "
                          "sharded gradients); use train.precision=bf16 or fp32")
    if dc.offload and not hardware.cuda:
        raise ConfigError("train.distributed.offload: only for GPU runs (a CPU run's shards are in CPU memory already)")


def prepare(cfg: Config, device: str | None = None, precision: str | None = None, world: World = ALONE) -> Setup:
    """Build and check everything a run needs. `device` / `precision` override the config's
    (e.g. a GPU run resumed on a CPU-only machine). Under torchrun every process builds the same
    setup; its batches are its slice of each global batch, on its own GPU."""
    # an unknown method or an option it does not take, or a tracker not installed: refused before any data is read
    _check_method(cfg)
    check_trackers(cfg.train.report_to)
    hardware = resolve(
        device or cfg.train.device,
        precision or cfg.train.precision,
        names=("--device" if device else "train.device", "--precision" if precision else "train.precision"),
    )
    _check_distributed(cfg, hardware, world)
    if world.distributed and hardware.cuda:  # one GPU per process: torchrun's LOCAL_RANK
        hardware = dataclasses.replace(hardware, device=torch.device("cuda", world.local_rank))
    if cfg.train.deterministic:
        _deterministic_kernels()
    earlier_labels, earlier = {}, None
    if cfg.model.init_from:
        earlier = run_checkpoint(Path(cfg.model.init_from), "best")
        earlier_labels = {n: spec["labels"] for n, spec in json.loads((earlier / "heads.json").read_text()).items()}
        model_path = str(earlier)
        log.info("init_from %s: backbone, LM head and heads %s", earlier, ", ".join(earlier_labels) or "-")
    else:
        model_path = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    decoder = is_decoder(load_model_config(model_path))
    objectives = {n: resolve_objective(sc.objective, decoder, n) for n, sc in cfg.sources.items()}
    sources, dev, test = build(cfg, tokenizer, objectives, earlier_labels, cfg.model.allow_new_labels)
    evals, eval_objectives = build_evals(cfg, decoder)
    objectives.update(eval_objectives)
    if not isinstance(sources[cfg.train.primary], MemorySource):
        raise ConfigError(f"sources.{cfg.train.primary}.text.stream: the primary source must be sized; set "
                          "stream: false (loads its blocks into memory) or choose another train.primary")
    _check_early_stopping(cfg, dev, objectives)

    # every generator a library might draw from, as transformers' set_seed does: routetune's own
    # draws use torch's generator and seeds derived from (seed, name, step); Python's and NumPy's
    # global ones are seeded too, so the state a checkpoint saves is the same in every process
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    torch.manual_seed(cfg.train.seed)  # newly initialised LM-head weights, dropout
    model = _build_model(cfg, model_path, sources, objectives, hardware, earlier)

    distilled = [n for n, s in cfg.sources.items() if s.distill > 0]
    if distilled:
        how = model.enable_teacher(hardware.precision)
        log.info("self-distillation on %s: the teacher is %s", ", ".join(distilled), how)
    _speed_levers(cfg, model, sources, hardware, world)
    router, total, _ = plan_run(cfg, source_sizes(sources))
    r = cfg.routing
    batches = RoutedBatches(router, sources, cfg.train.batch_size, r.granularity, r.on_exhausted, world.rank,
                            world.size)
    batches.lockstep = world.distributed and cfg.train.distributed.strategy == "fsdp"
    per_epoch = math.ceil(len(sources[cfg.train.primary]) / cfg.train.batch_size)
    setup = Setup(cfg, model_path, tokenizer, model, sources, objectives, batches, total, per_epoch, hardware,
                  dev, test, evals=evals, world=world)
    return dataclasses.replace(setup, source_table=log_sources(setup))


def _check_method(cfg: Config) -> None:
    """The method exists, takes the options given, and can train over the base as configured."""
    method = methods.get(cfg.peft.method)
    method.check_options(cfg.peft, cfg.freeze)
    if cfg.model.quantize != "none":
        check_quantizable(method, cfg.model.quantize)


def _build_model(cfg: Config, model_path: str, sources: dict, objectives: dict, hardware: Hardware,
                 earlier: Path | None) -> RoutedModel:
    """The backbone with a head per labelled source (and, with init_from, the earlier run's other
    heads, frozen), the method applied, on the device."""
    method = methods.get(cfg.peft.method)
    dtype = base_dtype(cfg, method, hardware)
    quantization = None
    if cfg.model.quantize != "none":
        quantization = {"quantize": cfg.model.quantize, "double": cfg.model.quantize_double}
        if earlier is not None:
            raise ConfigError("model.quantize: not with model.init_from (start from the base model)")
    model = build_model(model_path, cfg.train.seed, cfg.model.attention, str(hardware.device) if quantization
                        else hardware.device.type, dtype, quantization)
    for name, src in sources.items():
        head = objective_table.get(objectives[name]).head
        if head is not None:
            options = {"threshold": cfg.sources[name].threshold} if head == "binary-classification" else {}
            model.add_head(name, head, src.labels, derive_seed(cfg.train.seed, "head", name),
                           pooler_from=model_path, **options)
    if earlier is not None:
        if (earlier / "routetune.json").is_file():
            raise ConfigError(f"model.init_from: {cfg.model.init_from} was trained with an adapter method; "
                              "starting from adapter checkpoints is not supported yet")
        earlier_specs = json.loads((earlier / "heads.json").read_text())
        for name, spec in earlier_specs.items():  # earlier tasks' heads this run does not train: carried, frozen
            if name not in model.heads:
                model.add_head(name, spec["kind"], spec["labels"], 0,
                               **{k: spec[k] for k in ("pooling", "threshold") if k in spec})
        model.load_heads_from(earlier, list(earlier_specs))
    apply_method(model, cfg.peft, cfg.freeze, model_path)
    if cfg.model.base_dtype == "bf16":
        model.to(torch.bfloat16)  # the heads and any new trainable part too: AdamW's state follows its parameters
        log.info("model: every weight in bf16, the trained ones and their optimizer state too (model.base_dtype)")
    elif quantization:
        upcast_trained(model)
        log.info("model: the base held in %s (bitsandbytes), computed in %s; the adapters in fp32", cfg.model.quantize,
                 str(dtype).removeprefix("torch."))
    elif dtype != torch.float32:
        upcast_trained(model)
        log.info("model: the frozen base held in %s (train.precision), once; the trained parameters and their "
                 "optimizer state in fp32 (model.base_dtype)", hardware.precision)
    model.to(hardware.device)
    if earlier is not None:
        for name in model.heads:
            if name not in sources:
                model.heads[name].requires_grad_(False)
                log.info("head %s (from %s) is kept unchanged: no source of this run trains it", name, earlier)
    if not any(p.requires_grad for p in model.lm.parameters()) and model.prompt is None:
        lm_sources = [n for n, o in objectives.items() if objective_table.get(o).lm_loss and n in sources
                      and cfg.routing.weights and cfg.routing.weights.get(n, 0) > 0]
        if lm_sources:
            raise ConfigError(f"sources.{lm_sources[0]}: nothing its {objectives[lm_sources[0]]} loss reaches is "
                              "trainable (the backbone is frozen and the LM head is tied to the frozen embeddings); "
                              "drop the source or train part of the backbone")
    return model


def base_dtype(cfg: Config, method, hardware: Hardware) -> torch.dtype:
    """`model.base_dtype`: the training precision for a base the method freezes (bf16 or fp16, where
    the run trains in it), fp32 for a base that trains (full fine-tuning) or that the method needs in
    full (`low_precision_base` false: DoRA, BitFit); bf16 for every weight when asked."""
    if cfg.model.base_dtype == "bf16":
        if hardware.precision != "bf16":
            raise ConfigError(f"model.base_dtype=bf16: needs train.precision bf16 (it is {hardware.precision} here)")
        if cfg.model.quantize != "none":
            raise ConfigError("model.base_dtype=bf16: not with model.quantize (the adapters over a quantized base "
                              "train in fp32)")
        return torch.bfloat16
    if cfg.model.base_dtype == "fp32" or method.freezable or not method.low_precision_base:
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(hardware.precision, torch.float32)


def upcast_trained(model: RoutedModel) -> None:
    """Trained parameters (adapters, biases, virtual tokens, an LM head asked for) in fp32 over a
    base held in 16 bits: their updates and optimizer state keep full precision."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _speed_levers(cfg: Config, model: RoutedModel, sources: dict, hardware: Hardware, world: World) -> None:
    """The switches of docs/benchmarks.md (speed levers), each where it applies."""
    if cfg.train.group_by_length:
        for src in sources.values():
            if isinstance(src, MemorySource):
                src.group_by_length(cfg.train.batch_size)
    if cfg.train.fast_dropout and hardware.cuda:
        # a CPU lever: torch's per-element Bernoulli draws are slow on CPU only; CUDA's dropout
        # kernel draws its mask in the same fused pass
        log.info("train.fast_dropout: skipped on %s (a CPU lever; CUDA's own dropout kernel is used)",
                 hardware.device)
    elif cfg.train.fast_dropout:
        use_fast_dropout(model)
        use_fast_attention_dropout(model.lm)
    model.fused_lm_loss = cfg.train.fused_lm_loss
    if cfg.train.padding_free:
        _padding_free(model, cfg.train.packed_attention, hardware)
    if cfg.train.gradient_checkpointing:
        if not model.lm.supports_gradient_checkpointing:
            raise ConfigError(f"train.gradient_checkpointing: {type(model.lm).__name__} does not support it")
        # non-reentrant: works with frozen inputs (adapters) and keeps the RNG state for dropout;
        # transformers 5.x renames the switch (the old name warns, then goes in v6)
        enable = getattr(model.lm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    buffered = cfg.train.embedding_grad_buffer
    if buffered == "auto":  # a CPU lever: the fresh gradient's pages are faulted in every step there
        buffered = not hardware.cuda and not world.distributed
    if buffered:
        use_embedding_grad_buffer(model.lm)


def _padding_free(model: RoutedModel, attention: str, hardware: Hardware) -> None:
    """`train.padding_free`: the packed layout where the model allows it, else one log line;
    `train.packed_attention`: how attention sees the packed examples."""
    reason = packing.why_not(model)
    if reason is not None:
        log.info("train.padding_free: padded batches (%s)", reason)
        return
    if attention == "flex":
        config = model.lm.config
        p = attention_dropout(config)
        if p:
            raise ConfigError(f"train.packed_attention=flex: {config.model_type} trains with attention dropout {p} "
                              "and FlexAttention has none; use padded or per_example")
        if not hardware.cuda:
            raise ConfigError(f"train.packed_attention=flex: trains on CUDA only (PyTorch has no FlexAttention "
                              f"backward on {hardware.device}); use padded or per_example")
    use_packed_attention(model.lm)
    model.padding_free = True
    model.packed_attention = attention


def _deterministic_kernels() -> None:
    """`train.deterministic`: kernels that give the same result on every run (cuBLAS needs its
    workspace setting before its first call)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    log.info("train.deterministic: deterministic kernels (CUBLAS_WORKSPACE_CONFIG=%s)",
             os.environ["CUBLAS_WORKSPACE_CONFIG"])


def _check_early_stopping(cfg: Config, dev: dict, objectives: dict) -> None:
    es = cfg.train.early_stopping
    available = [f"{n}/{m}" for n, s in dev.items() for m in metric_names(s, objectives[n], cfg.sources[n])]
    if not dev:
        if es.patience is not None:
            raise ConfigError("train.early_stopping.patience: early stopping needs a dev set")
        return
    if es.metric not in available:
        raise ConfigError(f"train.early_stopping.metric: {es.metric!r} is not a dev metric of this run "
                          f"(available: {', '.join(available)})")


def log_sources(setup: Setup) -> list[dict]:
    """Log each source's size, share, expected examples and passes over the run; returns them as rows."""
    cfg, total = setup.cfg, setup.total_steps
    router = setup.batches.router
    names = router.names
    shares = [router.schedule.mean(i) if router.schedule.kind != "constant" else float(router.schedule.start[i])
              for i in range(len(names))]
    per_step = 1 if cfg.routing.granularity == "batch" else cfg.train.batch_size
    rows = []
    log.info("model %s -> %s", cfg.model.name, setup.model_path)
    log.info("routing: strategy %s, granularity %s, schedule %s, on_exhausted %s, seed %d", cfg.routing.strategy,
             cfg.routing.granularity, router.schedule.kind, cfg.routing.on_exhausted, cfg.routing.seed)
    for i, (name, src) in enumerate(setup.sources.items()):
        decisions = total * per_step * shares[i]
        examples = decisions * (cfg.train.batch_size if per_step == 1 else 1)
        objective = setup.objectives[name]
        if isinstance(src, TextStream):
            size, passes = None, None
            log.info("source %-12s %-24s %8s  share %5.1f%%  ~%d blocks (stream of %d files, size unknown)",
                     name, objective, "-", 100 * shares[i], round(examples), len(src.files))
        else:
            size = len(src)
            passes = decisions / setup.primary_batches_per_epoch if (per_step == 1 and name == cfg.train.primary) \
                else examples / size
            log.info("source %-12s %-24s %8d  share %5.1f%%  ~%d examples  ~%.2f passes",
                     name, objective, size, 100 * shares[i], round(examples), passes)
            if isinstance(src, LabelledSource) and src.n_truncated_words:
                log.warning("source %s: %d words in %d sentences are beyond max_length=%d and are not trained on",
                            name, src.n_truncated_words, src.n_truncated_sentences, cfg.model.max_length)
            elif src.n_truncated:
                log.warning("source %s: %d of %d examples were cut to max_length=%d", name, src.n_truncated,
                            size, cfg.model.max_length)
        for split, sets in (("dev", setup.dev), ("test", setup.test)):
            if name in sets:
                log.info("  %s %s: %s (%s)", name, split, _count(sets[name]), sets[name].origin)
        rows.append({"source": name, "objective": objective, "size": size, "share": shares[i],
                     "expected_examples": examples, "expected_passes": passes})
    log.info("%d steps of batch %d (%g epochs of %s%s)", total, cfg.train.batch_size, cfg.train.epochs,
             cfg.train.primary, f", max_steps {cfg.train.max_steps}" if cfg.train.max_steps else "")
    return rows


def _count(evalset: EvalSet) -> str:
    if evalset.kind == "text":
        return f"{len(evalset.items)} text part(s)"
    return f"{len(evalset.items)} examples"
