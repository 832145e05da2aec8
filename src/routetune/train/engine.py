"""The training loop. ``Trainer.run`` reads top to bottom: draw a routed batch, compute each
source's loss, step, log, evaluate, checkpoint, maybe stop. Everything the loop carries from one
step to the next lives in state that is checkpointed, so a resumed run continues exactly."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from routetune.device import to_device
from routetune.errors import RoutetuneError, RunError
from routetune.evaluate.tasks import score_sets
from routetune.model.frozen_bf16 import FrozenBf16
from routetune.train import checkpoint as ckpt
from routetune.train import events
from routetune.train.callbacks import EarlyStopping, MetricsLog
from routetune.train.faults import maybe_kill
from routetune.train.setup import Setup

log = logging.getLogger("routetune")


class NonFiniteLoss(RoutetuneError):
    pass


@dataclass
class SourceStats:
    batches: int = 0
    examples: int = 0
    tokens: int = 0
    loss_sum: float = 0.0  # since the last log event
    loss_n: int = 0
    ema: float | None = None

    def add(self, n_examples: int, n_tokens: int, loss: float) -> None:
        self.batches += 1
        self.examples += n_examples
        self.tokens += n_tokens
        self.loss_sum += loss
        self.loss_n += 1
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss

    def flush(self) -> dict:
        out = {"loss": self.loss_sum / self.loss_n if self.loss_n else None, "batches": self.batches,
               "examples": self.examples, "tokens": self.tokens}
        self.loss_sum, self.loss_n = 0.0, 0
        return out


@dataclass
class FitResult:
    steps: int
    best_step: int | None
    best_metric: float | None
    stopped_early: bool
    train_seconds: float
    tokens: int
    sources: dict = field(default_factory=dict)


def build_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights: no decay
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum)
    return torch.optim.AdamW(groups, lr=tc.lr, fused=tc.fused or None)


def truncate_log(path: Path, step: int) -> None:
    """Drop events logged after `step` (they belong to the part of a run that a resume redoes).
    A last line cut off by a kill mid-write is dropped with a warning; a bad line elsewhere is an
    error naming file and line."""
    if not path.is_file():
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RunError(f"{path}: not valid UTF-8; the run's log is damaged") from None
    kept = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                log.warning("%s:%d: dropped a line cut off by an interrupted write", path, n)
                continue
            raise RunError(f"{path}:{n}: not a JSON line; the run's log is damaged") from None
        if not isinstance(event, dict):
            raise RunError(f"{path}:{n}: expected a JSON object per line")
        if event.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def scored_units(objective: str, tensors: dict) -> torch.Tensor:
    """Per example, what its source's loss averages over: scored tokens (labels that are not
    -100; for causal LM the shifted targets), or 1 for a sequence-level label."""
    labels = tensors["labels"]
    if labels.dim() == 1:
        return torch.ones(labels.shape[0], device=labels.device)
    if objective == "causal-lm":
        labels = labels[:, 1:]
    return (labels != -100).sum(1).float()


def micro_batches(tensors: dict, objective: str, k: int):
    """The batch in `k` slices of consecutive examples, each cut to its own longest row, with
    the slice's share of the batch's scored units; slices with none are skipped."""
    units = scored_units(objective, tensors)
    total = float(units.sum())
    n = tensors["input_ids"].shape[0]
    size = math.ceil(n / k)
    for start in range(0, n, size):
        piece = {key: v[start:start + size] for key, v in tensors.items()}
        u = float(units[start:start + size].sum())
        if u == 0 or total == 0:
            continue
        width = int(piece["attention_mask"].sum(1).max())  # right padding beyond it is not needed
        piece = {key: v[:, :width] if v.dim() == 2 else v for key, v in piece.items()}
        yield piece, u / total


class Trainer:
    def __init__(self, setup: Setup, run_dir: Path):
        self.setup, self.run_dir = setup, run_dir
        cfg, tc = setup.cfg, setup.cfg.train
        self.model, self.batches = setup.model, setup.batches
        self.objectives = {n: s.objective for n, s in setup.sources.items()}
        self.optimizer = build_optimizer(self.model, tc)
        name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[tc.schedule]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=round(tc.warmup_ratio * setup.total_steps),
                                       num_training_steps=setup.total_steps)
        es = tc.early_stopping
        self.stopper = EarlyStopping(es.metric, es.mode, es.patience, es.min_delta)
        self.stats = {n: SourceStats() for n in setup.sources}
        self.train_seconds = 0.0
        self.skipped_in_a_row = 0
        self.ckpt_dir = run_dir / "checkpoints"
        self.after_checkpoint: list = []  # called with the step after each step checkpoint is complete
        self.last_save = time.monotonic()
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.plan_log = None  # opened in run(), after a resume has truncated the file
        self.loss_weights = cfg.routing.loss_weights
        self.distill = {n: s.distill for n, s in cfg.sources.items() if s.distill > 0}
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.hw = setup.hardware
        # fp16 needs loss scaling (its range is too small for gradients); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.hw.device.type) if self.hw.precision == "fp16" else None
        self.clip_in_optimizer = tc.optimizer == "adamw" and tc.fused and self.scaler is None
        # bf16 copies of frozen Linear weights while training (see model/frozen_bf16.py), where the
        # method allows them (DoRA reads the base weight for its magnitude norm)
        self.frozen = FrozenBf16(self.model) if (self.hw.precision == "bf16" and tc.bf16_frozen_weights
                                                 and self.model.method.frozen_bf16) else None

    # ---------------------------------------------------------------- the loop
    def run(self) -> FitResult:
        setup, tc = self.setup, self.setup.cfg.train
        batches, model = self.batches, self.model
        start = batches.step
        if start == 0:
            self.metrics.write(events.START, total_steps=setup.total_steps, sources=setup.source_table,
                               labels=setup.labels, routing=batches.router.state_dict())
        bar = tqdm(total=setup.total_steps, initial=start, disable=not tc.progress, desc="train",
                   dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 30.0)
        stopped = False
        if self.frozen is not None:
            self.frozen.cast()
        if tc.log_plan:
            self.plan_log = (self.run_dir / "plan.jsonl").open("a", encoding="utf-8")
        model.train()
        for step in range(start, setup.total_steps):
            if batches.finished:
                log.info("routing: stop policy %s ended the run after step %d", setup.cfg.routing.on_exhausted, step)
                break
            t0 = time.perf_counter()
            parts = batches.next()
            if self.plan_log:
                for p in parts:
                    self.plan_log.write(json.dumps({"step": step + 1, "source": p.source, "ids": p.example_ids}) + "\n")
                self.plan_log.flush()
            part_losses = self.train_step(step, parts)
            self.train_seconds += time.perf_counter() - t0
            done = step + 1
            bar.update(1)
            bar.set_postfix({n: f"{s.ema:.3f}" for n, s in self.stats.items() if s.ema is not None}, refresh=False)
            update = batches.router.observe(step, part_losses)
            if update is not None:
                self.metrics.write(events.ROUTE_UPDATE, **update)
            if done % tc.log_every == 0 or done == setup.total_steps:
                self.log_train(done, step)
            epoch_end = any(p.epoch_ended and p.source == tc.primary for p in parts)
            due_eval = bool((tc.eval_every_steps and done % tc.eval_every_steps == 0) or (tc.eval_each_epoch and epoch_end))
            if setup.dev and due_eval:
                stopped = self.evaluate(done)
            if (setup.dev and due_eval) or stopped or done == setup.total_steps or self.save_due(done):
                self.save(done)
            maybe_kill("after_step", done)
            if stopped:
                break
        bar.close()
        if self.frozen is not None:
            self.frozen.restore()
        saved = ckpt.step_checkpoints(self.ckpt_dir)
        if not saved or saved[-1][0] != batches.step:
            self.save(batches.step)  # a stop policy ended the run between checkpoints
        if self.plan_log:
            self.plan_log.close()
        return FitResult(steps=batches.step, best_step=self.stopper.best_step, best_metric=self.stopper.best,
                         stopped_early=stopped, train_seconds=self.train_seconds,
                         tokens=sum(s.tokens for s in self.stats.values()),
                         sources={n: {"batches": s.batches, "examples": s.examples, "tokens": s.tokens}
                                  for n, s in self.stats.items()})

    def save_due(self, done: int) -> bool:
        """A step checkpoint after the first step (so a kill at any later moment can resume), every
        `save_every_steps`, and when `save_every_minutes` have passed since the last one."""
        tc = self.setup.cfg.train
        minutes = tc.save_every_minutes
        return (done == 1 or bool(tc.save_every_steps and done % tc.save_every_steps == 0)
                or bool(minutes and time.monotonic() - self.last_save >= 60 * minutes))

    def train_step(self, step: int, parts: list) -> dict[str, float]:
        """Forward each source's part, combine the losses, update. Returns per-source losses."""
        tc = self.setup.cfg.train
        if tc.grad_accum > 1:
            return self.accumulated_step(step, parts)
        n_total = sum(len(p.example_ids) for p in parts)
        total, losses = 0.0, {}
        for part in parts:  # one part per source in the batch (always one with granularity=batch)
            loss = self.part_loss(part.source, to_device(part.tensors, self.hw.device))
            value = loss.item()
            if not math.isfinite(value):
                return self.non_finite(step, part, value)
            losses[part.source] = value
            total = total + self.loss_weights.get(part.source, 1.0) * len(part.example_ids) / n_total * loss
        (self.scaler.scale(total) if self.scaler is not None else total).backward()
        self.update(parts, losses)
        return losses

    def part_loss(self, source: str, tensors: dict) -> torch.Tensor:
        """One source's loss on a batch (or micro-batch) already on the device, under autocast:
        self-distillation where the source has a share, its objective's loss otherwise."""
        with self.hw.autocast():
            share = self.distill.get(source)
            if share:
                return self.model.distill_loss(self.objectives[source], tensors, share)
            return self.model.loss(source, self.objectives[source], tensors)

    def update(self, parts: list, losses: dict[str, float]) -> None:
        """Clip, step the optimizer and the schedule, count the step's examples."""
        tc = self.setup.cfg.train
        if self.scaler is not None:
            if tc.max_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.trainable, tc.max_grad_norm)
            self.scaler.step(self.optimizer)  # skipped by the scaler when a gradient overflowed
            self.scaler.update()
        else:
            if tc.max_grad_norm is not None:
                self.clip(tc.max_grad_norm)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_in_a_row = 0
        for part in parts:
            self.stats[part.source].add(len(part.example_ids), part.n_tokens, losses[part.source])

    def accumulated_step(self, step: int, parts: list) -> dict[str, float]:
        """`train.grad_accum` micro-batches per part, backward after each, one update. A part's
        loss is a mean over its scored units (tokens, or examples for sequence heads), so each
        micro-batch's mean is weighted by its share of the part's units: the sum is the part's
        loss, and the gradient the one a single batch would give (up to rounding)."""
        n_total = sum(len(p.example_ids) for p in parts)
        losses = {}
        for part in parts:
            scale = self.loss_weights.get(part.source, 1.0) * len(part.example_ids) / n_total
            value = 0.0
            for tensors, weight in micro_batches(to_device(part.tensors, self.hw.device), self.objectives[part.source],
                                                 self.setup.cfg.train.grad_accum):
                loss = self.part_loss(part.source, tensors)
                v = loss.item()
                if not math.isfinite(v):
                    return self.non_finite(step, part, v)
                value += weight * v
                scaled = scale * weight * loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            losses[part.source] = value
        self.update(parts, losses)
        return losses

    def clip(self, max_norm: float) -> None:
        """Clip the gradients' global norm to `max_norm`, as torch's clip_grad_norm_ does. With the
        fused AdamW kernel the scaling is left to the optimizer: it divides each gradient by its
        `grad_scale` tensor as it reads it (the hook torch's GradScaler uses), so clipping reads
        the gradients once (the norm) instead of twice (norm, then an in-place multiply)."""
        if not self.clip_in_optimizer:
            torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
            return
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); dividing by its inverse
        self.optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)

    def non_finite(self, step: int, part, value: float) -> dict:
        tc = self.setup.cfg.train
        where = (f"step {step + 1}: non-finite loss {value} on a batch of source {part.source!r} "
                 f"(examples {part.example_ids[:8]})")
        self.optimizer.zero_grad(set_to_none=True)
        if tc.nonfinite == "abort":
            raise NonFiniteLoss(where + "; stopping (train.nonfinite=abort), no checkpoint of this step")
        self.skipped_in_a_row += 1
        self.scheduler.step()  # the step is used up; keep the schedule aligned with the plan
        self.metrics.write(events.SKIPPED, step=step + 1, source=part.source, loss=str(value))
        log.warning("%s; update skipped (%d in a row)", where, self.skipped_in_a_row)
        if self.skipped_in_a_row >= tc.max_skipped:
            raise NonFiniteLoss(where + f"; {self.skipped_in_a_row} consecutive skipped steps "
                                        f"(train.max_skipped={tc.max_skipped})")
        return {}

    def log_train(self, done: int, step: int) -> None:
        seen = sum(st.examples for st in self.stats.values()) or 1
        target = dict(zip(self.batches.router.names, self.batches.router.target(step).round(6).tolist()))
        self.metrics.write(events.TRAIN, step=done, lr=self.scheduler.get_last_lr()[0],
                           sources={n: {**st.flush(), "share": st.examples / seen, "target": target[n]}
                                    for n, st in self.stats.items()},
                           tokens_per_s=sum(st.tokens for st in self.stats.values()) / max(self.train_seconds, 1e-9))

    def evaluate(self, done: int) -> bool:
        st = self.setup
        flat, full = score_sets(self.model, st.dev, st.objectives, st.tokenizer, st.cfg, self.hw.precision)
        is_best, stop = self.stopper.update(flat, done)
        self.metrics.write(events.EVAL, step=done, split="dev", metrics=flat, best=is_best,
                           details={n: {k: v for k, v in s.items() if k in ("per_type", "per_class", "confusion")}
                                    for n, s in full.items()})
        log.info("step %d dev %s%s", done, "  ".join(f"{k}={v:.4f}" for k, v in flat.items()),
                 "  (best)" if is_best else "")
        if is_best:
            with self._exact_weights():
                ckpt.save_atomic(self.ckpt_dir / "best", lambda d: self.model.save(d, self.setup.tokenizer))
        if stop:
            log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at step %d)",
                     done, self.stopper.metric, self.stopper.patience, self.stopper.best, self.stopper.best_step)
            self.metrics.write(events.EARLY_STOP, step=done, best=self.stopper.best, best_step=self.stopper.best_step)
        return stop

    # ---------------------------------------------------------------- state
    def _exact_weights(self):
        return self.frozen.fp32() if self.frozen is not None else contextlib.nullcontext()

    def save(self, step: int) -> None:
        def write(folder: Path) -> None:
            self.model.save(folder, self.setup.tokenizer)
            maybe_kill("in_write", step)  # tests: a checkpoint folder with some files written, others not
            ckpt.save_optimizer(self.optimizer, folder)
            tensors, rng_meta = ckpt.rng_state()
            save_file(tensors, str(folder / "rng.safetensors"))
            state = {"step": step, "batches": self.batches.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "early_stopping": self.stopper.state_dict(), "stats": {n: asdict(s) for n, s in self.stats.items()},
                     "train_seconds": self.train_seconds, "skipped_in_a_row": self.skipped_in_a_row, "rng": rng_meta}
            (folder / "trainer_state.json").write_text(json.dumps(state))

        with self._exact_weights():
            ckpt.save_atomic(self.ckpt_dir / f"step-{step:08d}", write,
                             after_files=lambda tmp: maybe_kill("in_checkpoint", step))
        ckpt.prune(self.ckpt_dir, self.setup.cfg.train.keep_last)
        self.last_save = time.monotonic()
        for hook in self.after_checkpoint:
            hook(step)

    def restore(self, folder: Path) -> int:
        """Load everything from a verified step checkpoint; returns its step."""
        ckpt.verify(folder)
        self.model.load_weights(folder)
        ckpt.load_optimizer(self.optimizer, folder)
        state = json.loads((folder / "trainer_state.json").read_text())
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.batches.load_state_dict(state["batches"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.stats = {n: SourceStats(**s) for n, s in state["stats"].items()}
        self.train_seconds, self.skipped_in_a_row = state["train_seconds"], state["skipped_in_a_row"]
        ckpt.set_rng_state(load_file(str(folder / "rng.safetensors")), state["rng"])
        step = int(state["step"])
        for name in ("metrics.jsonl", "plan.jsonl"):
            truncate_log(self.run_dir / name, step)
        self.metrics.write(events.RESUME, step=step, checkpoint=folder.name)
        return step
