"""Data-parallel training on PyTorch's own engine: ``torch.distributed`` process groups started by
``torchrun``, gradients averaged by ``DistributedDataParallel``.

One process per GPU (backend ``nccl``) or per CPU socket (``gloo``), chosen by the run's device
(``train.device``, or ``resume --device``), not by whether the machine has a GPU: a CPU run on a
GPU machine uses gloo. ``ROUTETUNE_BACKEND=gloo|nccl`` overrides the choice. Every process builds the
same setup and the same routed plan (the router is a pure function of seed and step, so nothing
about the plan is communicated); each trains its slice of every global batch. Only rank 0 writes
the run folder; decisions that must agree (dev evaluation and early stopping, when to save) are
made on rank 0 and broadcast. See docs/architecture.md (data-parallel training).

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; without them this
module is a no-op world of one process. Under torchrun a single process also joins a process
group (e.g. one GPU with nccl), so that it runs the data-parallel code path.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("routetune")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Under torchrun (a process group), even of one process: the same code path as N."""
        return self.backend is not None

    def describe(self) -> dict:
        return {"processes": self.size, "backend": self.backend}

    # ------------------------------------------------------------ collectives (no-ops alone)
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (a new tensor; float64 on the CPU for gloo, exact)."""
        if not self.distributed:
            return tensor
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        out = tensor.to(device=device, dtype=torch.float64).clone()
        dist.all_reduce(out)
        return out.to(tensor.device)


ALONE = World()


def backend_for(device: str | None, cuda_available: bool, override: str | None = None) -> str:
    """The process-group backend of a run on `device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``):
    nccl where the run's tensors live on a GPU, gloo otherwise (or `override`)."""
    if override:
        if override not in ("gloo", "nccl"):
            raise ValueError(f"ROUTETUNE_BACKEND: expected gloo or nccl, got {override!r}")
        return override
    spec = device or "auto"
    on_gpu = spec.startswith("cuda") or (spec == "auto" and cuda_available)
    return "nccl" if on_gpu and cuda_available else "gloo"


def world(device: str | None = None) -> World:
    """This process's place in the run: joins the process group torchrun set up (once), with the
    backend of the run's `device` (see :func:`backend_for`)."""
    if "WORLD_SIZE" not in os.environ:  # not started by torchrun
        return ALONE
    size = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = backend_for(device, torch.cuda.is_available(), os.environ.get("ROUTETUNE_BACKEND"))
        if backend == "nccl":
            torch.cuda.set_device(local)
        # a generous timeout: rank 0 alone scores the base model and the dev sets while the others wait
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
    return World(rank, size, local, dist.get_backend())


def quiet_other_ranks(w: World) -> None:
    """Only rank 0 logs progress; the others report warnings and errors."""
    if not w.main:
        logging.getLogger("routetune").setLevel(logging.WARNING)


def wrap(model: torch.nn.Module, w: World):
    """The model behind DistributedDataParallel (gradients averaged over ranks during backward),
    or the model itself alone. Unused parameters are expected: a step trains the heads of the
    sources it drew, not the others."""
    if not w.distributed:
        return model
    on_gpu = next(model.parameters()).device.type == "cuda"
    ids = [w.local_rank] if on_gpu else None  # device_ids name a GPU; a CPU model takes none
    # buffers (position ids, ...) are equal on every rank: synced at start, not at each forward
    # (torch 2.13 renames the switch; older releases know only the first name)
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True, **sync)


def no_sync(ddp, last: bool):
    """Accumulate locally (no gradient exchange) for every micro-batch of a step but the last."""
    if last or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()
