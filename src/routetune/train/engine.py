"""The training loop. It reads top to bottom: draw a routed batch, compute its source's loss,
step, log, evaluate, maybe stop. Early stopping and checkpointing live in small stateful helpers."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from routetune.errors import RoutetuneError
from routetune.evaluate.metrics import evaluate_tagging
from routetune.model.inference import autocast
from routetune.train.callbacks import EarlyStopping, MetricsLog
from routetune.train.checkpoint import save_atomic
from routetune.train.setup import TAG_METRICS, Setup

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


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights: no decay
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def evaluate_dev(setup: Setup, sets: dict) -> tuple[dict, dict]:
    """Score every labelled source on the given sets; returns (flat metrics, full reports)."""
    flat, full = {}, {}
    tc = setup.cfg.train
    for name, sentences in sets.items():
        scores = evaluate_tagging(setup.model, name, setup.tokenizer, sentences, setup.cfg.model.max_length,
                                  tc.eval_batch_size, tc.precision)
        full[name] = scores
        flat.update({f"{name}/{m}": scores[m] for m in TAG_METRICS})
    return flat, full


def fit(setup: Setup, run_dir: Path) -> FitResult:
    cfg, tc = setup.cfg, setup.cfg.train
    model, batches = setup.model, setup.batches
    objectives = {n: s.objective for n, s in setup.sources.items()}
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(tc.warmup_ratio * setup.total_steps),
                                                setup.total_steps)
    stopper = EarlyStopping(tc.early_stopping.metric, tc.early_stopping.mode, tc.early_stopping.patience,
                            tc.early_stopping.min_delta)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    metrics.write("start", total_steps=setup.total_steps, sources=setup.source_table,
                  labels=setup.labels, routing=batches.router.state_dict())
    stats = {n: SourceStats() for n in setup.sources}
    ckpt = run_dir / "checkpoints"
    train_seconds, stopped = 0.0, False
    # Redraw at most every 30 s when stderr is not a terminal, so logs stay readable.
    bar = tqdm(total=setup.total_steps, disable=not tc.progress, desc="train", dynamic_ncols=True,
               mininterval=0.2 if sys.stderr.isatty() else 30.0)
    model.train()

    loss_weights = cfg.routing.loss_weights
    for step in range(batches.step, setup.total_steps):
        if batches.finished:
            log.info("routing: stop policy %s ended the run after step %d", cfg.routing.on_exhausted, step)
            break
        t0 = time.perf_counter()
        parts = batches.next()
        n_total = sum(len(p.example_ids) for p in parts)
        total_loss, part_losses = 0.0, {}
        for part in parts:  # one part per source in the batch (always one with granularity=batch)
            with autocast(tc.precision):
                loss = model.loss(part.source, objectives[part.source], part.tensors)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(f"step {step + 1}: non-finite loss {value} on a batch of source "
                                    f"{part.source!r} (examples {part.example_ids[:8]}); stopping without "
                                    "a checkpoint of this step")
            part_losses[part.source] = value
            total_loss = total_loss + loss_weights.get(part.source, 1.0) * len(part.example_ids) / n_total * loss
        total_loss.backward()
        if tc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0
        for part in parts:
            stats[part.source].add(len(part.example_ids), part.n_tokens, part_losses[part.source])
        update = batches.router.observe(step, part_losses)
        if update is not None:
            metrics.write("route_update", **update)

        done = step + 1
        bar.update(1)
        bar.set_postfix({n: f"{s.ema:.3f}" for n, s in stats.items() if s.ema is not None}, refresh=False)
        if done % tc.log_every == 0 or done == setup.total_steps:
            seen = sum(st.examples for st in stats.values()) or 1
            target = dict(zip(batches.router.names, batches.router.target(step).round(6).tolist()))
            metrics.write("train", step=done, lr=scheduler.get_last_lr()[0],
                          sources={n: {**st.flush(), "share": st.examples / seen, "target": target[n]}
                                   for n, st in stats.items()},
                          tokens_per_s=sum(st.tokens for st in stats.values()) / max(train_seconds, 1e-9))
        epoch_end = any(p.epoch_ended and p.source == tc.primary for p in parts)
        due = (tc.eval_every_steps and done % tc.eval_every_steps == 0) or (tc.eval_each_epoch and epoch_end)
        if setup.dev and due:
            flat, full = evaluate_dev(setup, setup.dev)
            is_best, stopped = stopper.update(flat, done)
            metrics.write("eval", step=done, split="dev", metrics=flat, best=is_best,
                          per_type={n: s["per_type"] for n, s in full.items()})
            log.info("step %d dev %s%s", done, "  ".join(f"{k}={v:.4f}" for k, v in flat.items()),
                     "  (best)" if is_best else "")
            if is_best:
                save_atomic(ckpt / "best", lambda d: model.save(d, setup.tokenizer))
            if stopped:
                log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at step %d)",
                         done, stopper.metric, stopper.patience, stopper.best, stopper.best_step)
                metrics.write("early_stop", step=done, best=stopper.best, best_step=stopper.best_step)
                break
    bar.close()
    save_atomic(ckpt / "last", lambda d: model.save(d, setup.tokenizer))
    return FitResult(steps=batches.step, best_step=stopper.best_step, best_metric=stopper.best,
                     stopped_early=stopped, train_seconds=train_seconds,
                     tokens=sum(s.tokens for s in stats.values()),
                     sources={n: {"batches": s.batches, "examples": s.examples, "tokens": s.tokens}
                              for n, s in stats.items()})
