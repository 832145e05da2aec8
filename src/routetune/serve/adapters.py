"""The models one server answers for, by name (`routetune serve RUN_A RUN_B ...`).

One base model is held once; the first run is loaded as usual, and each further run, trained with
the same peft method on the same base (checked by the base's SHA-256 digest), adds its adapter to
it under the run's name. A request's `model` picks a run by its folder name, or the base model
itself (its adapters switched off) by the base's name; `/v1/models` lists them all, each run with
the base as its `parent`. Runs of other methods (full fine-tuning, bottleneck adapters, BitFit,
prompt tuning) are served alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from routetune.errors import RunError
from routetune.model.load import base_digest
from routetune.model.methods.base import NOTE
from routetune.serve.openai_api import OpenAIError
from routetune.training import checkpoint as ckpt

FIRST = "default"  # the peft adapter name a run's own adapter is loaded under


class Served:
    def __init__(self, model, base_id: str, first_run: str, adapters: bool):
        self.model, self.base_id = model, base_id
        self.created = int(time.time())
        # model id -> the peft adapter that answers for it (None: the base, adapters off)
        self.ids: dict[str, str | None] = {first_run: FIRST if adapters else None}
        self.adapters = adapters
        if adapters and base_id != first_run:
            self.ids[base_id] = None
        self.current: str | None = FIRST if adapters else None

    @classmethod
    def load(cls, model, cfg, run_dirs: list[Path], checkpoint: str = "best") -> Served:
        """`model` is the first run's (loaded, not yet prepared for inference); the others' adapters
        are added to it."""
        base_id = Path(cfg.model.name).name
        first = Path(run_dirs[0]).name
        served = cls(model, base_id, first, model.method.checkpoint == "adapter" and model.prompt is None)
        for run_dir in run_dirs[1:]:
            name = Path(run_dir).name
            if name in served.ids:
                raise RunError(f"{run_dir}: two served models would be called {name!r} (runs are named by their "
                               "folder); rename one folder")
            folder = ckpt.run_checkpoint(run_dir, checkpoint)
            note = json.loads((folder / NOTE).read_text()) if (folder / NOTE).is_file() else {}
            if not served.adapters or note.get("method") != model.method.name:
                raise RunError(f"{run_dir}: only runs that trained peft adapters ({model.method.name} like "
                               f"{first}) on one base can be served together; serve it on its own")
            if note.get("base_digest") != base_digest(model.base_path):
                raise RunError(f"{run_dir}: trained on another base ({note.get('base')}) than {first} "
                               f"({model.base_path}); runs served together share one base model")
            model.method.add_adapter(model, folder, name)
            served.ids[name] = name
        return served

    def adapter_of(self, model_id: str):
        if model_id not in self.ids:
            raise OpenAIError(404, f"The model '{model_id}' does not exist (this server has: "
                                   f"{', '.join(self.ids)})", "model", "model_not_found")
        return self.ids[model_id]

    def use(self, adapter: str | None) -> None:
        """Switch the model to `adapter` (the engine's thread, between forward passes)."""
        if self.adapters and adapter != self.current:
            self.model.method.use_adapter(self.model, adapter)
            self.current = adapter

    def card(self, model_id: str) -> dict:
        adapter = self.adapter_of(model_id)
        parent = self.base_id if adapter is not None else None
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "routetune",
                "parent": parent, "root": self.base_id}

    def cards(self) -> list[dict]:
        return [self.card(m) for m in self.ids]
