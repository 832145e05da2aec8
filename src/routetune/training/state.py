"""A run's training state, saved and restored in one place.

A step checkpoint holds everything the loop carries from one step to the next, so that a resumed
run continues exactly: the model's trained weights (in the method's format), the optimizer, the
schedule, the grad scaler, the router and each source's position, early stopping, the per-source
counters, every rank's random-number state, and the length of the append-only logs at that step
(a resume cuts them back to exactly that, and refuses a log that has lost part of it).
:func:`save_step` writes it (rank 0; every rank gives its random state), :func:`restore` reads it
into a freshly built :class:`~routetune.training.engine.Trainer`. The format does not depend on the
number of processes: an FSDP run gathers the full weights and optimizer state to rank 0 to write them
(each rank takes its slice back when restoring), or, with `train.distributed.checkpoint: sharded`,
every rank writes its own shards of the trained weights and optimizer state with
torch.distributed.checkpoint (no process holds them whole), which reshards to any number of
processes when read. The last step's checkpoint is always gathered: `best`, `last`, eval, predict,
serve and export read a plain model folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
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


def save_step(trainer, step: int, final: bool = False) -> None:
    """A step checkpoint of `trainer` (a collective: every rank must call it; rank 0 writes, or every
    rank its shards when sharded checkpoints are on and this is not the run's `final` step)."""
    rngs = trainer.world.gather(rng_state())  # on every rank: a collective
    if not final and sharded_checkpoints(trainer):
        _save_sharded(trainer, step, rngs)
        return
    optimizer = distributed.optimizer_state(trainer.ddp, trainer.optimizer)  # sharded: gathered to rank 0
    with distributed.full_params(trainer.ddp):  # sharded: every rank gathers, rank 0 writes
        if trainer.world.main:
            _write_step(trainer, step, rngs, optimizer)


def sharded_checkpoints(trainer) -> bool:
    return distributed.sharded(trainer.ddp) and trainer.setup.cfg.train.distributed.checkpoint == "sharded"


def _trainer_state(trainer, step: int, rngs: list) -> dict:
    if trainer.plan_log:
        trainer.plan_log.flush()
    run_dir = trainer.run_dir
    logs = {name: (run_dir / name).stat().st_size if (run_dir / name).is_file() else 0 for name in rf.APPEND_LOGS}
    return {"step": step, "batches": trainer.batches.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "grad_scaler": trainer.scaler.state_dict() or None, "early_stopping": trainer.stopper.state_dict(),
            "stats": {n: asdict(s) for n, s in trainer.stats.items()}, "train_seconds": trainer.train_seconds,
            "skipped_in_a_row": trainer.skipped_in_a_row, "rng": rngs[0][1],
            "rng_ranks": [meta for _, meta in rngs[1:]], "logs": logs, "processes": trainer.world.size}


def _write_rngs(folder: Path, rngs: list) -> None:
    for rank, (tensors, _) in enumerate(rngs):
        save_file(tensors, str(folder / rng_file(rank)))


def _write_step(trainer, step: int, rngs: list, optimizer: dict) -> None:
    state = _trainer_state(trainer, step, rngs)

    def write(folder: Path) -> None:
        trainer.model.save(folder, trainer.setup.tokenizer)
        maybe_kill("in_write", step)  # tests: a checkpoint folder with some files written, others not
        save_optimizer(optimizer, folder)
        _write_rngs(folder, rngs)
        (folder / ckpt.TRAINER_STATE).write_text(json.dumps(state))

    ckpt.save_atomic(trainer.ckpt_dir / step_folder(step), write,
                     after_files=lambda tmp: maybe_kill("in_checkpoint", step))
    ckpt.prune(trainer.ckpt_dir, trainer.setup.cfg.train.keep_last)


def _save_sharded(trainer, step: int, rngs: list) -> None:
    """Every rank writes its shards of the trained weights and the optimizer state into rank 0's
    temporary folder; then rank 0 adds the rest and completes it as any checkpoint (manifest, rename,
    COMPLETE). A process killed at any point leaves a temporary folder that is never loaded and that
    `recover` removes; the previous checkpoint is untouched."""
    world, folder = trainer.world, trainer.ckpt_dir / step_folder(step)
    tmp = world.broadcast(ckpt.begin_atomic(folder) if world.main else None)
    dcp.save(distributed.sharded_state(trainer.ddp, trainer.optimizer), checkpoint_id=str(tmp / ckpt.SHARDED))
    maybe_kill("in_write", step)  # tests: every rank's part written, nothing else
    world.barrier()
    if world.main:
        state = _trainer_state(trainer, step, rngs)
        _write_rngs(tmp, rngs)
        (tmp / ckpt.TRAINER_STATE).write_text(json.dumps(state))
        ckpt.finish_atomic(folder, tmp, after_files=lambda t: maybe_kill("in_checkpoint", step))
        ckpt.prune(trainer.ckpt_dir, trainer.setup.cfg.train.keep_last)
    world.barrier()  # no rank trains on while the checkpoint may still fail


def restore(trainer, folder: Path) -> int:
    """Load everything from a verified step checkpoint into `trainer`; returns its step."""
    ckpt.verify(folder)
    if ckpt.is_sharded(folder):  # written in shards: each rank reads what its own shards need
        distributed.load_sharded(trainer.ddp, trainer.optimizer, folder / ckpt.SHARDED)
    else:
        with distributed.loading(trainer.ddp):  # sharded: each rank keeps its slice of the full tensors
            trainer.model.load_weights(folder)
        distributed.load_optimizer_state(trainer.ddp, trainer.optimizer, read_optimizer(folder))
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
        set_rng_state(load_file(str(folder / rng_file(rank))), metas[rank])
        return
    log.warning("the checkpoint holds random-number state for %d process(es); rank %d starts its own "
                "(dropout differs from an uninterrupted run; the plan does not)", len(metas), rank)
    torch.manual_seed(derive_seed(trainer.setup.cfg.train.seed, "rank", rank, step))


# ------------------------------------------------------------------ optimizer and random-number state files
def save_optimizer(state: dict, folder: Path) -> None:
    """An optimizer's `state_dict()` (parameters numbered, full tensors) as safetensors + JSON."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous()
                meta["state"][str(pid)][key] = "tensor"
            else:
                meta["state"][str(pid)][key] = value
    save_file(tensors, str(folder / ckpt.OPTIMIZER_TENSORS))
    (folder / ckpt.OPTIMIZER_META).write_text(json.dumps(meta))


def read_optimizer(folder: Path) -> dict:
    """What :func:`save_optimizer` wrote, as an optimizer's `state_dict()`."""
    meta = json.loads((folder / ckpt.OPTIMIZER_META).read_text())
    tensors = load_file(str(folder / ckpt.OPTIMIZER_TENSORS))
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_file(rank: int) -> str:
    """The random-number state of data-parallel rank `rank` (rank 0: the single-process name)."""
    return ckpt.RNG if rank == 0 else f"rng-rank{rank}.safetensors"


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    import random

    import numpy as np

    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout masks drawn on the GPU
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return (tensors,
            {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]})


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        for i, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    elif cuda:  # a GPU run resumed on a CPU: its CPU generator draws from here on (docs/reliability.md)
        log.info("the checkpoint holds CUDA random-number state; this machine has no CUDA device, so dropout "
                 "draws from the CPU generator from here on")
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
