"""Data-parallel training on PyTorch's own engine: ``torch.distributed`` process groups started by
``torchrun``, gradients averaged by ``DistributedDataParallel`` (``train.distributed.strategy: ddp``)
or parameters, gradients and optimizer state sharded by FSDP2's ``fully_shard`` (``fsdp``).

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
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, get_state_dict,
                                                     set_optimizer_state_dict, set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.experimental import implicit_replication

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
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over ranks (a new tensor)."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if not self.distributed:
            return tensor
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        out = tensor.to(device=device, dtype=torch.float64).clone()
        dist.all_reduce(out, op=op)
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


def wrap(model: torch.nn.Module, w: World, options=None, precision: str = "fp32"):
    """The model behind DistributedDataParallel (gradients averaged over ranks during backward),
    or sharded by FSDP2 (`options.strategy == "fsdp"`, see :func:`shard`), or the model itself alone.
    Unused parameters are expected: a step trains the heads of the sources it drew, not the others."""
    if not w.distributed:
        return model
    if options is not None and options.strategy == "fsdp":
        return shard(model, options, precision)
    on_gpu = next(model.parameters()).device.type == "cuda"
    ids = [w.local_rank] if on_gpu else None  # device_ids name a GPU; a CPU model takes none
    # buffers (position ids, ...) are equal on every rank: synced at start, not at each forward
    # (torch 2.13 renames the switch; older releases know only the first name)
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True, **sync)


def no_sync(ddp, last: bool):
    """Accumulate locally (no gradient exchange) for every micro-batch of a step but the last."""
    if isinstance(ddp, FSDPModule):  # FSDP2: reduce-scatter only after the last micro-batch's backward
        ddp.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


# ---------------------------------------------------------------- FSDP2 (train.distributed.strategy: fsdp)
def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one: the outermost modules whose class the
    Hugging Face model names in `_no_split_modules` (the classes that must stay on one device),
    except a module holding a weight tied to one outside it (BERT's embeddings and its masked-LM
    decoder): tied weights stay together in the root's group."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or [])
    params = list(model.named_parameters(remove_duplicate=False))
    found, inside = [], set()
    for prefix, module in model.named_modules():
        if not names & {c.__name__ for c in type(module).__mro__} or id(module) in inside:  # FSDP2 subclasses
            continue
        own = {id(p) for p in module.parameters()}
        if any(id(p) in own and not name.startswith(prefix + ".") for name, p in params):
            continue  # tied to a weight outside: left to the root
        found.append(module)
        inside |= {id(m) for m in module.modules()}
    return found


def shard(model: torch.nn.Module, options, precision: str) -> torch.nn.Module:
    """FSDP2 in place: each block its own shard group (all-gathered for its forward and backward, then
    freed when `options.reshard_after_forward`), then the root (embeddings, final norm, LM head and
    task heads: tied input/output embeddings sit in this one group). The root keeps its parameters
    gathered after forward, as backward needs them at once. In bf16 the parameters are gathered and
    computed in bf16 and gradients reduced in fp32; `options.offload` keeps the shards, their gradients
    and optimizer state in CPU memory between uses (GPU runs). The optimizer must be built after
    this: the parameters become DTensor shards."""
    policy = {}
    if precision == "bf16":
        policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if options.offload:
        policy["offload_policy"] = CPUOffloadPolicy()
    found = blocks(model)
    if not found:
        log.warning("train.distributed.strategy=fsdp: this model names no blocks (_no_split_modules); the whole "
                    "model is one shard group, gathered at once for each forward")
    for block in found:
        fully_shard(block, reshard_after_forward=options.reshard_after_forward, **policy)
    fully_shard(model, reshard_after_forward=False, **policy)
    # FSDP2 takes the first module to run forward as the root; rank 0's scoring calls the backbone
    # (not the root) first, so the root is fixed now (what its first forward would do; no collective)
    model._get_fsdp_state()._lazy_init()
    model._routetune_reshard = options.reshard_after_forward
    return model


def sharded(model) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_params(model):
    """Every sharded parameter gathered in full on every rank for the duration (a collective: every
    rank enters), so that rank 0 alone can score, measure or save the model as in one process; the
    shards are freed again on leaving. Nothing happens without FSDP. Costs one full copy of the
    weights per rank while it lasts (what loading the model cost already)."""
    if not sharded(model):
        yield
        return
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in groups:  # the same order on every rank: the all-gathers pair up
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
        # FSDP2 makes `state_dict()` swap the shards back in (and free the gathered weights); while
        # rank 0 saves from the gathered weights that must not happen. torch has no public switch for
        # this or for the prefetch record below: private attributes of torch 2.13's FSDP2, used here
        # only (tests/training/test_fsdp.py fails if a torch release moves them).
        module._get_fsdp_state()._fsdp_param_group._to_sharded = _nothing
    try:
        yield
    finally:
        for module in groups:
            group = module._get_fsdp_state()._fsdp_param_group
            del group._to_sharded
            # rank 0's forward passes in here were recorded for backward prefetching, which must follow
            # the training forward alone on every rank: forgotten, as after a backward pass
            group._post_forward_indices.clear()
            getattr(group.comm_ctx, "post_forward_order", []).clear()  # set at the first forward
            module.reshard()
            if module is not model:
                module.set_reshard_after_forward(model._routetune_reshard, recurse=False)


def _nothing() -> None:
    pass


def loading(model):
    """Load full tensors into a sharded model: under this context a plain tensor copied into a
    DTensor shard is read as the full (replicated) value, so each rank keeps its own slice; the
    methods' `load_weights` and `load_state_dict` then work unchanged. Nothing without FSDP."""
    return implicit_replication() if sharded(model) else contextlib.nullcontext()


def optimizer_state(model, optimizer) -> dict | None:
    """The optimizer's state as one process holds it (parameters numbered in the optimizer's order,
    full tensors), whatever the sharding: a checkpoint that resumes on any number of processes.
    Under FSDP a collective (every rank calls it) whose result is on rank 0 only (None elsewhere)."""
    if not sharded(model):
        return optimizer.state_dict()
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return None
    index, groups = {}, []
    for group in full["param_groups"]:
        ids = [index.setdefault(fqn, len(index)) for fqn in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[fqn]: s for fqn, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a state written by :func:`optimizer_state` (from any number of processes); under FSDP every
    rank passes the full state and keeps its shards of it."""
    if not sharded(model):
        optimizer.load_state_dict(state)
        return
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in state["param_groups"]]
    full = {"state": {fqns[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


TRAINED = StateDictOptions(ignore_frozen_params=True)  # a frozen base is the base model's: not saved


def sharded_state(model, optimizer) -> dict:
    """The trained weights and the optimizer state as this rank holds them (its shards under FSDP, keyed
    by parameter name), for torch.distributed.checkpoint to write each rank's part."""
    weights, optim = get_state_dict(model, optimizer, options=TRAINED)
    # torch drops a frozen parameter under its first name only: a tied alias of one (BERT's or a tied
    # decoder's output projection is the input embedding) would be saved whole at every checkpoint
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {"model": {k: v for k, v in weights.items() if k not in frozen}, "optimizer": optim}


def load_sharded(model, optimizer, path) -> None:
    """Read a checkpoint :func:`sharded_state` wrote, on any number of processes, sharded or not:
    torch.distributed.checkpoint gives each rank the parts its own shards (or full tensors) need. It
    refuses a checkpoint without one of the trained tensors asked for; the frozen ones stay as loaded."""
    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
