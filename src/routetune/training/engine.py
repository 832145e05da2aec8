"""The training loop. ``Trainer.run`` reads top to bottom: draw a routed batch, compute each
source's loss, step, log, evaluate, checkpoint, maybe stop; ``begin`` and ``end`` hold what comes
before the first step and after the last. Everything the loop carries from one step to the next
lives in state that is checkpointed, so a resumed run continues exactly."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from routetune.run_folder import RunFolder
from routetune.device import to_device
from routetune.errors import RoutetuneError
from routetune.logs import quiet
from routetune.evaluate.tasks import score_sets
from routetune.model.frozen_bf16 import FrozenBf16
from routetune.training import checkpoint as ckpt
from routetune.seeds import derive_seed
from routetune.training import distributed, events, state
from routetune.training.budget import Budget
from routetune.training.callbacks import EarlyStopping, MetricsLog, SourceStats
from routetune.training.compiled import Compiler, eager
from routetune.training.faults import maybe_kill
from routetune.training.optimizer import build_optimizer
from routetune.training.setup import Setup
from routetune.training.weighting import micro_batches

log = logging.getLogger("routetune")


class NonFiniteLoss(RoutetuneError):
    pass


@dataclass
class FitResult:
    steps: int
    best_step: int | None
    best_metric: float | None
    stopped_early: bool
    train_seconds: float
    tokens: int
    sources: dict = field(default_factory=dict)
    compiled: dict | None = None  # train.compile: graphs, compile seconds, recompilations, fallback


class Trainer:
    def __init__(self, setup: Setup, run_dir: Path, metrics: MetricsLog | None = None,
                 after_checkpoint: list | None = None):
        """`metrics`: the run's metrics log (the lifecycle's; a new one on RUN/metrics.jsonl if not
        given); `after_checkpoint`: called with the step after each step checkpoint is complete."""
        self.setup, self.run_dir = setup, run_dir
        cfg, tc = setup.cfg, setup.cfg.train
        self.model, self.batches = setup.model, setup.batches
        self.objectives = {n: s.objective for n, s in setup.sources.items()}
        self.hw, self.world = setup.hardware, setup.world
        # before the optimizer: FSDP2 replaces the parameters by their shards (the model itself in one process)
        self.ddp = distributed.wrap(self.model, self.world, tc.distributed, self.hw.precision)
        self.optimizer = build_optimizer(self.model, tc)
        self.compiler = Compiler.of(self.model, tc.compile, tc.compile_backend, self.hw.device, self.world.main)
        name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[tc.schedule]
        warmup = round(tc.warmup_ratio * setup.total_steps)
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=setup.total_steps)
        es = tc.early_stopping
        self.stopper = EarlyStopping(es.metric, es.mode, es.patience, es.min_delta)
        self.stats = {n: SourceStats() for n in setup.sources}
        self.train_seconds, self.skipped_in_a_row = 0.0, 0
        self.ckpt_dir = RunFolder(run_dir).checkpoints
        self.after_checkpoint = list(after_checkpoint or [])
        self.last_save = time.monotonic()
        self.metrics = metrics or MetricsLog(RunFolder(run_dir).metrics, enabled=setup.world.main)  # rank 0 writes
        self.plan_log = None  # opened in run(), after a resume has truncated the file
        self.loss_weights = cfg.routing.loss_weights
        self.distill = {n: s.distill for n, s in cfg.sources.items() if s.distill > 0}
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.budget = Budget.of(setup)  # a retention budget's measurements (routing.budget), or None
        self.names = list(self.batches.router.names)
        self.bad_examples: dict[str, list] = {}
        self.time_checkpoint = False  # rank 0's clock says a checkpoint is due (shared with the step's losses)
        # fp16 needs loss scaling (its range is too small for gradients); bf16 and fp32 do not: the
        # disabled scaler passes every call through (scale returns the loss, step steps)
        self.scaler = torch.amp.GradScaler(self.hw.device.type, enabled=self.hw.precision == "fp16")
        self.clip_in_optimizer = (tc.optimizer == "adamw" and tc.fused and not self.scaler.is_enabled()
                                  and not distributed.sharded(self.ddp))
        # bf16 copies of frozen Linear weights while training (see model/frozen_bf16.py), where the
        # method allows them (DoRA reads the base weight for its magnitude norm)
        # (not under FSDP: its mixed-precision policy gathers the weights in bf16 already)
        self.frozen = FrozenBf16(self.model) if (self.hw.precision == "bf16" and tc.bf16_frozen_weights
                                                 and self.model.method.frozen_bf16
                                                 and not distributed.sharded(self.ddp)) else None
        if tc.bf16_frozen_weights and self.hw.precision != "bf16" and self.world.main:
            log.info("train.bf16_frozen_weights: skipped in %s (it saves the casts of bf16 autocast)",
                     self.hw.precision)

    # ---------------------------------------------------------------- the loop
    def run(self) -> FitResult:
        """The loop: each step the router's batch, its forward, backward and update, then the
        training log, a dev evaluation and a checkpoint where they are due."""
        setup, batches = self.setup, self.batches
        bar = self.begin()
        stopped = False
        for step in range(batches.step, setup.total_steps):
            if batches.finished:
                log.info("routing: stop policy %s ended the run after step %d", setup.cfg.routing.on_exhausted, step)
                break
            t0 = time.perf_counter()
            parts = batches.next()
            self.log_plan(step)
            losses = self.train_step(step, parts)
            if self.compiler is not None and self.compiler.compiled_now:
                self.compiler.seconds += time.perf_counter() - t0  # compiling: kept out of the training time
            else:
                self.train_seconds += time.perf_counter() - t0
            done = step + 1
            self.after_step(bar, step, losses)
            evaluated = bool(setup.dev) and self.eval_due(done)
            if evaluated:
                stopped = self.evaluate_dev(done)
            if evaluated or stopped or done == setup.total_steps or self.checkpoint_due(done):
                self.save(done, final=stopped or done == setup.total_steps)
            maybe_kill("after_step", done)
            if stopped:
                break
        return self.end(bar, stopped)

    def begin(self):
        """Before the first step of this session: the start event, the progress bar, bf16 weight
        copies, the plan log, each rank's dropout stream; returns the bar."""
        setup, tc = self.setup, self.setup.cfg.train
        start = self.batches.step
        if start == 0:
            self.metrics.write(events.START, total_steps=setup.total_steps, sources=setup.source_table,
                               labels=setup.labels, routing=self.batches.router.state_dict())
        bar = tqdm(total=setup.total_steps, initial=start, disable=not tc.progress or quiet(), desc="train",
                   dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 30.0)
        if self.frozen is not None:
            self.frozen.cast()
        if tc.log_plan and self.world.main:
            self.plan_log = RunFolder(self.run_dir).plan.open("a", encoding="utf-8")
        if start == 0 and self.world.rank > 0:  # each rank its own dropout stream (rank 0 keeps the seed's)
            torch.manual_seed(derive_seed(setup.cfg.train.seed, "rank", self.world.rank))
        if start == 0 and self.budget is not None:  # the base model's value of the budget's measure
            self.measure_budget(0)
        self.model.train()
        return bar

    def log_plan(self, step: int) -> None:
        if self.plan_log:  # the global draws: the same on any number of processes
            for d in self.batches.last_draws:
                self.plan_log.write(json.dumps({"step": step + 1, "source": d.source, "ids": d.ids}) + "\n")
            self.plan_log.flush()

    def after_step(self, bar, step: int, losses: dict) -> None:
        """The progress bar, the router's feedback (adaptive routing, a retention budget's measurement)
        and the training log."""
        done = step + 1
        bar.update(1)
        bar.set_postfix({n: f"{s.ema:.3f}" for n, s in self.stats.items() if s.ema is not None}, refresh=False)
        update = self.batches.router.observe(step, losses)
        if update is not None:
            self.metrics.write(events.ROUTE_UPDATE, **update)
        if done % self.setup.cfg.train.log_every == 0 or done == self.setup.total_steps:
            self.log_train(done, step)  # before a measurement: the target it logs is the one its steps ran under
        if self.budget is not None and self.budget.due(done):
            self.measure_budget(done)

    def measure_budget(self, step: int) -> None:
        """The retention budget's measurement after `step` (rank 0 measures; sharded weights are gathered
        on every rank for it)."""
        with distributed.full_params(self.ddp), eager(self.compiler):
            self.budget.measure(step, self.model, self.batches.router, self.world, self.metrics)

    def end(self, bar, stopped: bool) -> FitResult:
        """After the last step: a checkpoint of it if none was written, the run's result."""
        bar.close()
        if self.frozen is not None:
            self.frozen.restore()
        step = self.batches.step
        saved = ckpt.step_checkpoints(self.ckpt_dir) if self.world.main else None
        # a stop policy ended the run between checkpoints, or after a sharded one: the last is gathered
        if self.world.broadcast(not saved or saved[-1][0] != step or ckpt.is_sharded(saved[-1][1])):
            self.save(step, final=True)
        if self.plan_log:
            self.plan_log.close()
        compiled = self.compiler.close() if self.compiler is not None else None
        return FitResult(compiled=compiled, steps=step, best_step=self.stopper.best_step, best_metric=self.stopper.best,
                         stopped_early=stopped, train_seconds=self.train_seconds,
                         tokens=sum(s.tokens for s in self.stats.values()),
                         sources={n: {"batches": s.batches, "examples": s.examples, "tokens": s.tokens}
                                  for n, s in self.stats.items()})

    def eval_due(self, done: int) -> bool:
        """A dev evaluation after step `done`: every `eval_every_steps`, at the end of each pass over
        the primary source, and at the last step of a run that has had none (it ends first)."""
        tc, setup = self.setup.cfg.train, self.setup
        epoch_end = any(d.epoch_ended and d.source == tc.primary for d in self.batches.last_draws)
        due = bool((tc.eval_every_steps and done % tc.eval_every_steps == 0) or (tc.eval_each_epoch and epoch_end))
        if setup.dev and not due and done == setup.total_steps and self.stopper.best_step is None:
            log.info("no dev evaluation in the run's %d steps (it ends before the first one was due): "
                     "evaluating its last step", done)
            return True
        return due

    def checkpoint_due(self, done: int) -> bool:
        """A step checkpoint after the first step (so a kill at any later moment can resume), every
        `save_every_steps`, and when `save_every_minutes` have passed since the last one (by rank
        0's clock, which reaches every rank with the step's losses)."""
        tc = self.setup.cfg.train
        return done == 1 or bool(tc.save_every_steps and done % tc.save_every_steps == 0) or self.time_checkpoint

    def time_checkpoint_due(self) -> bool:
        """Rank 0's clock: `save_every_minutes` have passed since the last checkpoint."""
        minutes = self.setup.cfg.train.save_every_minutes
        return bool(minutes and time.monotonic() - self.last_save >= 60 * minutes)

    def train_step(self, step: int, parts: list) -> dict[str, float]:
        """Forward and backward each source's part (in `train.grad_accum` micro-batches), then
        update. Returns the per-source losses of the global batch.

        A part's loss is a mean over its scored units (tokens, or examples for sequence heads);
        the step's loss is the mean over parts weighted by examples (and `loss_weights`). Each
        micro-batch's loss is scaled by its share of its part's units over all ranks, so the
        gradient averaged by DistributedDataParallel is the one a single process computes on the
        global batch (up to rounding), whatever the number of processes or micro-batches."""
        k = self.setup.cfg.train.grad_accum
        # slices and counts are made on the CPU copies; only the pieces move to the device
        lockstep = self.batches.lockstep
        pieces = [(part, to_device(tensors, self.hw.device), 0.0 if part.stand_in else units)
                  for part in parts if lockstep or not part.stand_in
                  for tensors, units in micro_batches(part.tensors, self.objectives[part.source], k,
                                                         self.setup.model.padding_free)]
        totals = self.global_counts(parts, pieces)
        if lockstep:
            pieces = self.lockstep(parts, pieces)
        elif not pieces:  # nothing scored on this rank: a zero-weight pass keeps the ranks in step
            pieces = [(parts[0], to_device(parts[0].tensors, self.hw.device), 0.0)]
        self.bad_examples = {}
        if self.compiler is None:
            piece_losses = self.passes(pieces, totals)
        else:  # a compilation that fails is retried eagerly (training/compiled.py)
            piece_losses = self.compiler.step(lambda: self.passes(pieces, totals),
                                              lambda: self.optimizer.zero_grad(set_to_none=True))
        # the step's one host synchronisation: every piece's loss comes back at once
        values = torch.stack([loss.double() for *_, loss in piece_losses]).cpu().tolist()
        loss_sums = torch.zeros(len(self.names) + 1, dtype=torch.float64)  # + rank 0's "a save is due by time"
        for (part, j, share, _), value in zip(piece_losses, values):
            if not math.isfinite(value) and not part.stand_in:
                self.bad_examples[part.source] = part.example_ids[:8]
            loss_sums[j] += share * value
        loss_sums[-1] = float(self.world.main and self.time_checkpoint_due())
        losses = self.world.sum(loss_sums)  # every rank: the global losses, and rank 0's clock
        self.time_checkpoint = bool(losses[-1] > 0)
        values = {n: float(losses[j]) for j, n in enumerate(self.names) if totals[j, 0] > 0 and totals[j, 1] > 0}
        bad = next((n for n, v in values.items() if not math.isfinite(v)), None)
        if bad is not None:
            return self.non_finite(step, bad, values[bad])
        self.update(values, totals)
        return values

    def passes(self, pieces: list, totals: torch.Tensor) -> list:
        """Forward and backward of each micro-batch; returns (part, source index, share, loss) of each."""
        all_examples = totals[:, 0].sum().item()
        piece_losses = []
        for i, (part, tensors, units) in enumerate(pieces):
            j = self.names.index(part.source)
            share = units / totals[j, 1].item() if units else 0.0  # of the source's units over all ranks
            scale = self.loss_weights.get(part.source, 1.0) * totals[j, 0].item() / all_examples
            with distributed.no_sync(self.ddp, last=i == len(pieces) - 1):
                loss = self.part_loss(part.source, tensors)
                scaled = loss * (scale * share * self.world.size)
                self.scaler.scale(scaled).backward()
            piece_losses.append((part, j, share, loss.detach()))
        return piece_losses

    def lockstep(self, parts: list, pieces: list) -> list:
        """Sharded training gathers each block's weights at every forward and reduces the gradients
        of the parameters that have one, so every rank must run the same passes in the same order: per
        part (one per draw on every rank, in the plan's order) as many micro-batches as the rank with
        the most, the others padded with zero-weight repeats."""
        mine = torch.tensor([sum(1 for piece in pieces if piece[0] is part) for part in parts], dtype=torch.float64)
        most = self.world.max(mine).long().tolist()
        out = []
        for part, n in zip(parts, most):
            own = [piece for piece in pieces if piece[0] is part]
            tensors = own[-1][1] if own else to_device(part.tensors, self.hw.device)
            out += own + [(part, tensors, 0.0)] * (n - len(own))
        return out

    def global_counts(self, parts: list, pieces: list) -> torch.Tensor:
        """Per source (router order): examples, scored units and tokens of the step over all ranks
        (one all-reduce); the units are those of this rank's micro-batches."""
        counts = torch.zeros(len(self.names), 3, dtype=torch.float64)
        for part in parts:
            if not part.stand_in:
                counts[self.names.index(part.source)] += torch.tensor([len(part.example_ids), 0, part.n_tokens],
                                                                      dtype=torch.float64)
        for part, _, units in pieces:
            counts[self.names.index(part.source), 1] += units
        return self.world.sum(counts)

    def part_loss(self, source: str, tensors: dict) -> torch.Tensor:
        """One source's loss on a batch (or micro-batch) already on the device, under autocast,
        through DistributedDataParallel when there are several processes: self-distillation
        where the source has a share, its objective's loss otherwise."""
        with self.hw.autocast():
            return self.ddp(source, self.objectives[source], tensors, self.distill.get(source))

    def update(self, losses: dict[str, float], totals: torch.Tensor) -> None:
        """Clip, step the optimizer and the schedule, count the step's examples."""
        tc = self.setup.cfg.train
        if tc.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # fp16: the true gradients before their norm is taken
            self.clip(tc.max_grad_norm)
        self.scaler.step(self.optimizer)  # fp16: skipped when a gradient overflowed
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_in_a_row = 0
        for j, name in enumerate(self.names):
            if name in losses:
                self.stats[name].add(int(totals[j, 0]), int(totals[j, 2]), losses[name])

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

    def non_finite(self, step: int, source: str, value: float) -> dict:
        tc = self.setup.cfg.train
        where = f"step {step + 1}: non-finite loss {value} on the batch of source {source!r}"
        if source in self.bad_examples:
            where += f" (examples {self.bad_examples[source]})"
        self.optimizer.zero_grad(set_to_none=True)
        if tc.nonfinite == "abort":
            raise NonFiniteLoss(where + "; stopping (train.nonfinite=abort), no checkpoint of this step")
        self.skipped_in_a_row += 1
        self.scheduler.step()  # the step is used up; keep the schedule aligned with the plan
        self.metrics.write(events.SKIPPED, step=step + 1, source=source, loss=str(value))
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

    def evaluate_dev(self, done: int) -> bool:
        """Dev scores (rank 0 scores; every rank gets its numbers), early stopping, best checkpoint."""
        # sharded: gathered on every rank while rank 0 scores; compiled blocks score eagerly (no eval graphs)
        with distributed.full_params(self.ddp), eager(self.compiler):
            return self._evaluate_dev(done)

    def _evaluate_dev(self, done: int) -> bool:
        st = self.setup
        flat, full = score_sets(self.model, st.dev, st.objectives, st.tokenizer, st.cfg, self.hw.precision) \
            if self.world.main else (None, None)
        flat = self.world.broadcast(flat)  # one decision on every rank
        is_best, stop = self.stopper.update(flat, done)
        if not self.world.main:
            return stop
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

    # ---------------------------------------------------------------- state (training/state.py)
    def _exact_weights(self):
        return self.frozen.fp32() if self.frozen is not None else contextlib.nullcontext()

    def save(self, step: int, final: bool = False) -> None:
        """A step checkpoint of everything the loop carries (training/state.py), then the hooks; the
        `final` one is always gathered (a plain model folder)."""
        with self._exact_weights():
            state.save_step(self, step, final)
        self.last_save = time.monotonic()
        if self.world.main:
            for hook in self.after_checkpoint:
                hook(step)

    def restore(self, folder: Path) -> int:
        """Everything the loop carries, from a verified step checkpoint; returns its step."""
        step = state.restore(self, folder)
        self.metrics.write(events.RESUME, step=step, checkpoint=folder.name, processes=self.world.size)
        return step
