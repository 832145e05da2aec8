"""A run's training state, saved and restored in one place.

A step checkpoint holds everything the loop carries from one step to the next, so that a resumed
run continues exactly: the model's trained weights (in the method's format), the optimizer, the
schedule, the grad scaler, the router and each source's position, early stopping, the per-source
counters, every rank's random-number state, and the length of the append-only logs at that step
(a resume cuts them back to exactly that, and refuses a log that has lost part of it).
:func:`save_step` writes it (rank 0; every rank gives its random state), :func:`restore` reads it
into a freshly built :class:`~routetune.training.engine.Trainer`. The format does not depend on the
number of processes or on sharding (an FSDP run gathers the full weights and optimizer state to rank
0 to write them; each rank takes its slice back when restoring), so a run resumes on any number.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from routetune import run_folder as rf
from routetune.seeds import derive_seed
from routetune.training import checkpoint as ckpt
from routetune.training import distributed
from routetune.training.callbacks import SourceStats, truncate_log
from routetune.training.faults import maybe_kill

log = logging.getLogger("routetune")


def step_folder(step: int) -> str:
    return f"step-{step:08d}"


def save_step(trainer, step: int) -> None:
    """A step checkpoint of `trainer` (a collective: every rank must call it; rank 0 writes)."""
    rngs = trainer.world.gather(ckpt.rng_state())  # on every rank: a collective
    optimizer = distributed.optimizer_state(trainer.ddp, trainer.optimizer)  # sharded: gathered to rank 0
    with distributed.full_params(trainer.ddp):  # sharded: every rank gathers, rank 0 writes
        if trainer.world.main:
            _write_step(trainer, step, rngs, optimizer)


def _write_step(trainer, step: int, rngs: list, optimizer: dict) -> None:
    if trainer.plan_log:
        trainer.plan_log.flush()
    run_dir = trainer.run_dir
    logs = {name: (run_dir / name).stat().st_size if (run_dir / name).is_file() else 0 for name in rf.APPEND_LOGS}

    def write(folder: Path) -> None:
        trainer.model.save(folder, trainer.setup.tokenizer)
        maybe_kill("in_write", step)  # tests: a checkpoint folder with some files written, others not
        ckpt.save_optimizer(optimizer, folder)
        for rank, (tensors, _) in enumerate(rngs):
            save_file(tensors, str(folder / ckpt.rng_file(rank)))
        state = {"step": step, "batches": trainer.batches.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                 "grad_scaler": trainer.scaler.state_dict() or None, "early_stopping": trainer.stopper.state_dict(),
                 "stats": {n: asdict(s) for n, s in trainer.stats.items()}, "train_seconds": trainer.train_seconds,
                 "skipped_in_a_row": trainer.skipped_in_a_row, "rng": rngs[0][1],
                 "rng_ranks": [meta for _, meta in rngs[1:]], "logs": logs}
        (folder / ckpt.TRAINER_STATE).write_text(json.dumps(state))

    ckpt.save_atomic(trainer.ckpt_dir / step_folder(step), write,
                     after_files=lambda tmp: maybe_kill("in_checkpoint", step))
    ckpt.prune(trainer.ckpt_dir, trainer.setup.cfg.train.keep_last)


def restore(trainer, folder: Path) -> int:
    """Load everything from a verified step checkpoint into `trainer`; returns its step."""
    ckpt.verify(folder)
    with distributed.loading(trainer.ddp):  # sharded: each rank keeps its slice of the full tensors
        trainer.model.load_weights(folder)
    distributed.load_optimizer_state(trainer.ddp, trainer.optimizer, ckpt.read_optimizer(folder))
    state = json.loads((folder / ckpt.TRAINER_STATE).read_text())
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler.is_enabled() and state.get("grad_scaler"):
        trainer.scaler.load_state_dict(state["grad_scaler"])
    trainer.batches.load_state_dict(state["batches"])
    trainer.stopper.load_state_dict(state["early_stopping"])
    trainer.stats = {n: SourceStats(**s) for n, s in state["stats"].items()}
    trainer.train_seconds, trainer.skipped_in_a_row = state["train_seconds"], state["skipped_in_a_row"]
    step = int(state["step"])
    _restore_rng(trainer, folder, state, step)
    if trainer.world.main:
        for check_only in (True, False):  # every log checked before any is cut
            for name in rf.APPEND_LOGS:
                truncate_log(trainer.run_dir / name, step, state.get("logs", {}).get(name), check_only)
    return step


def _restore_rng(trainer, folder: Path, state: dict, step: int) -> None:
    """This rank's random-number state. A rank the checkpoint has none for (the run now has more
    processes than when it was saved) starts a stream of its own, as a new rank would."""
    rank = trainer.world.rank
    metas = [state["rng"], *state.get("rng_ranks", [])]
    if rank < len(metas):
        ckpt.set_rng_state(load_file(str(folder / ckpt.rng_file(rank))), metas[rank])
        return
    log.warning("the checkpoint holds random-number state for %d process(es); rank %d starts its own "
                "(dropout differs from an uninterrupted run; the plan does not)", len(metas), rank)
    torch.manual_seed(derive_seed(trainer.setup.cfg.train.seed, "rank", rank, step))
