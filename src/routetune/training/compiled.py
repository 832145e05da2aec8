"""Compiled training steps (`train.compile`): each transformer block compiled with `torch.compile`.

Regional compilation, as torchtune and accelerate do it: the blocks the model's `_no_split_modules`
name (the same ones sharded training wraps) are compiled in place with ``nn.Module.compile``, so
parameter names, state dicts, checkpoints, peft and FSDP see the model they always saw, and one
graph serves every block of a kind (dynamo inlines the module and takes its parameters as inputs).
Embeddings, heads, losses and routetune's packing stay eager: they change shape with each batch
and are a small part of a step.

Batches change shape every step (padding-free rows hold each batch's token count), so the blocks
are compiled for dynamic shapes from the start (dynamo would otherwise specialise on the first
shape and compile again at the first change). A run compiles a handful of graphs (e.g. one for a
block whose input needs no gradient, the first under LoRA, and one for the others), bounded by
torch's recompile limit (beyond it a block runs eager).
What was compiled and why is logged: the number of graphs, each recompilation's reason (torch's
own message) and the wall time of the steps that compiled, which is kept out of the training
time the throughput is computed from.

A compilation that fails (an operator the backend cannot lower, no C++ compiler, ...) must not end
the run: the step is run again eagerly from the same random state with the blocks uncompiled, and
the log says why in one line. What torch raises is not one type, so an error counts as the
compiler's when it is a dynamo exception or its traceback passes through torch's compiler
packages; anything else (a non-finite loss, running out of memory in an eager part) propagates.
"""

from __future__ import annotations

import contextlib
import logging
import re
import traceback

import torch

from routetune.training.distributed import blocks

log = logging.getLogger("routetune")

RECOMPILES = "torch._dynamo.guards.__recompiles"  # torch's artifact logger for recompilation reasons
COMPILER_PACKAGES = ("torch/_dynamo/", "torch/_inductor/", "torch/_functorch/", "torch/fx/")


# what `auto` picks on each kind of device, from measurements (docs/benchmarks.md): eager where
# compiling has not been measured to pay for itself
AUTO = {"cpu": (False, "auto: eager on the CPU, where compiled blocks gained 2-11% (AVX2) and 6% (native bf16) after "
                       "8-35 s of compiling, too little to pay for it in the runs measured (docs/benchmarks.md)"),
        "cuda": (False, "auto: eager on a GPU until compiled steps are measured there (train.compile=true compiles)")}


def wanted(setting, device: torch.device) -> tuple[bool, str]:
    """Whether to compile, and why (`train.compile`: true, false or auto)."""
    if setting is True or setting is False:
        return setting, f"train.compile={str(setting).lower()}"
    return AUTO.get(device.type, (False, f"auto: eager on {device.type}"))


def is_compiler_error(error: BaseException) -> bool:
    """Whether `error` came from torch's compiler (see the module docstring)."""
    from torch._dynamo.exc import TorchDynamoException

    if isinstance(error, TorchDynamoException):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return any(p in frame.filename.replace("\\", "/") for frame in frames for p in COMPILER_PACKAGES)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _Reasons(logging.Handler):
    """Collects torch's recompilation messages (first line of each)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        lines = [x.strip() for x in record.getMessage().splitlines() if x.strip()]
        failures = [x[2:].split("  #")[0].strip() for x in lines  # "- 0/1: tensor 'args[0]' size mismatch ..."
                    if re.match(r"- \d+/\d+: ", x)]
        self.lines.append(("; ".join(failures) if failures else lines[0] if lines else "")[:300])


class Compiler:
    """The compiled blocks of one training session; `step(run)` runs one training step through them."""

    def __init__(self, modules: list[torch.nn.Module], backend: str, main: bool = True):
        self.modules, self.backend, self.main = modules, backend, main
        self.active = bool(modules)
        self.graphs, self.seconds, self.fallback, self.compiled_now = 0, 0.0, None, False
        self.reasons = _Reasons()
        # torch writes the reasons only while its "recompiles" artifact is on (TORCH_LOGS=recompiles);
        # turned on here without torch's stderr handler, and off again at close unless it was on
        state = torch._logging._internal.log_state
        self._was_on = state.is_artifact_enabled("recompiles")
        state.enable_artifact("recompiles")
        recompiles = logging.getLogger(RECOMPILES)
        self._level, self._propagate = recompiles.level, recompiles.propagate
        recompiles.setLevel(logging.DEBUG)
        recompiles.propagate = self._was_on  # not to torch's stderr handler unless the user asked for it
        recompiles.addHandler(self.reasons)
        for module in modules:
            module.compile(backend=backend, dynamic=True)

    @classmethod
    def of(cls, model: torch.nn.Module, setting, backend: str, device: torch.device, main: bool = True
           ) -> Compiler | None:
        """Compile `model`'s blocks when `train.compile` asks for it (logged either way), else None."""
        on, why = wanted(setting, device)
        found = blocks(model) if on else []
        if on and not found:
            why = "no transformer blocks found (the model names none in _no_split_modules)"
        if main:
            log.info("train.compile: %s (%s)", f"{len(found)} blocks with {backend}" if found else "eager", why)
        return cls(found, backend, main) if found else None

    def step(self, run, before_retry):
        """`run()` (one training step's forwards and backwards) through the compiled blocks; sets
        `compiled_now` when it compiled new graphs (the caller counts that step's time as compiling).
        On a compiler error: `before_retry()` (clear what the failed try left), the blocks back to
        eager, the random state of the step's start, and `run()` again."""
        rng = _rng_state()
        graphs = _graphs()
        try:
            out = run()
        except Exception as error:  # noqa: BLE001 - classified just below; anything else is raised again
            if not self.active or not is_compiler_error(error):
                raise
            self.undo(error)
            before_retry()
            _set_rng_state(rng)
            out = run()
        new = _graphs() - graphs
        self.graphs += max(new, 0)
        self.compiled_now = new > 0
        return out

    def undo(self, error: BaseException) -> None:
        """Back to eager for the rest of the run, with the reason in one line."""
        inner = getattr(error, "inner_exception", None)  # BackendCompilerFailed: what the backend raised
        cause = f" ({type(inner).__name__}: {inner})" if inner is not None else ""
        first = (str(error).strip().splitlines() or [""])[0]
        self.fallback = f"{type(error).__name__}: {first}{cause}"[:400].replace("\n", " ")
        log.warning("train.compile: compiling failed, training continues eager (%s)", self.fallback)
        self._uncompile()
        torch._dynamo.reset()

    def _uncompile(self) -> None:
        for module in self.modules:
            module._compiled_call_impl = None  # what nn.Module.compile set: calls go to forward again
        self.active = False

    def close(self) -> dict:
        """The blocks eager again (scoring, prediction and export after training compile nothing);
        what was compiled (for the log and summary.json)."""
        self._uncompile()
        logging.getLogger(RECOMPILES).removeHandler(self.reasons)
        logging.getLogger(RECOMPILES).setLevel(self._level)
        logging.getLogger(RECOMPILES).propagate = self._propagate
        if not self._was_on:
            torch._logging._internal.log_state.artifact_names.discard("recompiles")
        out = {"blocks": len(self.modules), "backend": self.backend, "graphs": self.graphs,
               "seconds": round(self.seconds, 2), "recompilations": self.reasons.lines[:20],
               "fallback": self.fallback}
        if self.main:
            log.info("train.compile: %d graphs compiled in %.1f s (steps that compiled, outside the training time)%s",
                     self.graphs, self.seconds,
                     "".join(f"\n  recompiled: {r}" for r in self.reasons.lines[:20]))
        return out


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def eager(compiler: Compiler | None):
    """Compiled blocks run eagerly for the duration (dev scoring and budget measurements during
    training: no graphs for their shapes and grad mode), when there are any."""
    if compiler is None or not compiler.active:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")
