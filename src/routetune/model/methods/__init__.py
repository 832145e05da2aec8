"""Parameter-sharing methods: which backbone parameters train, and how their checkpoints look.

Each method is one object (:class:`~routetune.model.methods.base.Method`) in one module of this
package; :data:`METHODS` maps the config's ``peft.method`` to it. Everything else (which
parameters train, saving, loading, export, generation, the distillation teacher) asks the
method object, never its name.

=================  ======================  =================================================
``peft.method``    module                  checkpoint
=================  ======================  =================================================
``full`` (``none``) full.py                 a plain model folder (``freeze`` strategies apply)
``lora`` ``dora``  peft_tuners.py          peft adapter folder; ``export --merge`` folds it in
``ia3``            peft_tuners.py          peft adapter folder; ``export --merge`` folds it in
``prompt_tuning``  prompts/                peft adapter folder (virtual tokens; no merge)
``prefix_tuning``  prompts/                peft adapter folder (no merge, no generation)
``adapter``        bottleneck/             trained tensors + note (routetune's own; no merge)
``bitfit``         bitfit.py               trained tensors + note (bias terms)
=================  ======================  =================================================

Adding a method: a module (or folder) here with a ``Method`` subclass that declares its ``options``
(the ``peft.*`` keys it reads; others are refused), one line in :data:`METHODS`, one row in the
contract table of ``tests/model/test_methods.py``.
"""

from __future__ import annotations

from routetune.errors import ConfigError
from routetune.model.methods import bitfit, bottleneck, full, peft_tuners, prompts
from routetune.model.methods.base import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    full.METHOD,
    peft_tuners.LORA,
    peft_tuners.DORA,
    peft_tuners.IA3_METHOD,
    prompts.PROMPT_TUNING,
    prompts.PREFIX_TUNING,
    bottleneck.METHOD,
    bitfit.METHOD,
)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"peft.method: expected one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]
