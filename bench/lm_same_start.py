"""The causal-LM LoRA work of bench/quality_parity.py with the randomness taken out: routetune's
loop and the Hugging Face Trainer start from the same LoRA weights and train on the same blocks in
the same order, so what remains between them is the training loop itself (and, unless
``--set peft.dropout=0``, each side's LoRA-dropout masks).

    .venv/bin/python bench/lm_same_start.py --seeds 1 2 3                      # LoRA dropout 0.05
    .venv/bin/python bench/lm_same_start.py --seeds 1 --set peft.dropout=0     # no random draw at all
    .venv/bin/python bench/lm_same_start.py --seeds 1 2 --trainer-order runs/quality_parity_lm_s40_fp32.json

``--trainer-order`` turns it the other way round: routetune trains on the blocks the Trainer's own
run of that seed trains on, in its order, and is compared with that run (its results read from a
``bench/quality_parity.py --work lm`` JSON). The Trainer's order is a function of the seed alone:
accelerate's ``SeedableRandomSampler`` draws ``torch.randperm(n)`` from a generator seeded with the
seed (epoch 0). Its LoRA initialisation needs no copying: both sides seed torch's global generator
with the seed just before peft draws the adapters, so the same seed gives the same LoRA weights.

routetune trains first (``routetune.workflow.train``, share 0, the seed as train.seed and
routing.seed) while its LoRA weights before the first step and the blocks of every step are
recorded; the Trainer then gets those weights (copied into its peft model) and those blocks in that
order (a sequential sampler over them). Printed per seed: both sides' loss at a few steps, the
largest step-loss difference, and the domain-test and WikiText perplexities after training, scored
by the same code (routetune.evaluate.tasks.text_scores). ``--out``: JSON with every step's loss.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import replay_reference as rr
import torch


def run_routetune_recorded(seed: int, steps: int, out: Path, extra: list[str]) -> tuple[dict, dict]:
    """routetune's run, with its LoRA weights before the first step and each step's blocks."""
    from routetune.model.routed import RoutedModel

    seen = {"start": None, "blocks": [], "losses": []}
    original = RoutedModel.causal_lm_loss

    def recording(self, batch):
        if not torch.is_grad_enabled():
            return original(self, batch)
        if seen["start"] is None:
            seen["start"] = {k: v.detach().clone() for k, v in self.lm.named_parameters() if "lora_" in k}
        seen["blocks"] += batch["input_ids"].tolist()
        loss = original(self, batch)
        seen["losses"].append(loss.item())
        return loss

    RoutedModel.causal_lm_loss = recording
    try:
        result = rr.run_routetune(seed, 0.0, steps, "fp32", out, extra)
    finally:
        RoutedModel.causal_lm_loss = original
    return result, seen


def run_routetune_on_trainer_order(seed: int, steps: int, out: Path, extra: list[str]) -> tuple[dict, dict]:
    """routetune's run of `seed`, its task source serving the Trainer's epoch-0 order for that seed."""
    from routetune.data.sources import MemorySource

    original = MemorySource.permutation

    def trainer_order(self, epoch: int):
        if self.name != rr.TASK or epoch != 0:
            return original(self, epoch)
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).numpy()

    MemorySource.permutation = trainer_order
    try:
        result, seen = run_routetune_recorded(seed, steps, out, extra)
    finally:
        MemorySource.permutation = original
    return result, seen


def _blocks_in_order(seed: int, n: int, extra: list[str]) -> list[list[int]]:
    """The first `n` blocks of the Trainer's order for `seed` (to check that routetune trained on them)."""
    from routetune.config.load import load_config
    from routetune.data.build import build, resolve_objective
    from routetune.model.load import load_tokenizer, resolve_model

    cfg = load_config(rr.CONFIG, [*rr._weights(0.0), *extra])
    tok = load_tokenizer(resolve_model(cfg.model.name))
    sources, _, _ = build(cfg, tok, {k: resolve_objective(sc.objective, True, k) for k, sc in cfg.sources.items()})
    s = sources[rr.TASK]
    order = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed)).tolist()[:n]
    return [s.prefix + s.encoded[i].input_ids + s.suffix for i in order]


def trainer_order_main(a) -> None:
    reference = json.loads(a.trainer_order.read_text())
    if (reference.get("work"), reference.get("steps"), reference.get("precision")) != ("lm", a.steps, "fp32"):
        raise SystemExit(f"--trainer-order: {a.trainer_order} is not a --work lm run of {a.steps} steps in fp32")
    hf_runs = reference["runs"]["hf"]
    table = {"steps": a.steps, "precision": "fp32", "overrides": a.set, "date": time.strftime("%Y-%m-%d %H:%M"),
             "threads": torch.get_num_threads(), "trainer_runs": str(a.trainer_order), "runs": {}}
    with tempfile.TemporaryDirectory() as runs:
        for seed in a.seeds:
            if str(seed) not in hf_runs:
                raise SystemExit(f"--trainer-order: {a.trainer_order} has no Trainer run of seed {seed}")
            rt, seen = run_routetune_on_trainer_order(seed, a.steps, Path(runs), a.set)
            expected = _blocks_in_order(seed, len(seen["blocks"]), a.set)
            # a batch holding the short last block pads it: compare each row's first tokens
            if len(seen["blocks"]) != len(expected) or any(r[:len(e)] != e for r, e in zip(seen["blocks"], expected)):
                raise SystemExit(f"seed {seed}: routetune did not train on the Trainer's blocks in its order")
            hf = {"test": hf_runs[str(seed)]["test"], "wikitext": hf_runs[str(seed)]["wikitext"]}
            table["runs"][str(seed)] = {"routetune": {"test": rt[rr.TASK]["after"], "wikitext": rt[rr.HELD]["after"],
                                                      "seconds": rt["seconds"]},
                                        "hf": hf, "losses": seen["losses"]}
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(table, indent=2) + "\n")
            print(f"seed {seed}, the Trainer's order: routetune / Trainer: domain {rt[rr.TASK]['after']:.3f} / "
                  f"{hf['test']:.3f}, WikiText {rt[rr.HELD]['after']:.3f} / {hf['wikitext']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--set", action="append", default=["evals.wikitext.max_blocks=40"], metavar="KEY=VALUE",
                    help="Config override for both sides (default: evals.wikitext.max_blocks=40, as quality_parity)")
    ap.add_argument("--out", type=Path, default=rr.ROOT / "runs" / "lm_same_start.json")
    ap.add_argument("--trainer-order", type=Path, metavar="JSON",
                    help="routetune trains on the Trainer's own order of each seed; JSON: bench/quality_parity.py "
                         "--work lm results holding the Trainer's runs of those seeds")
    a = ap.parse_args()
    if a.trainer_order:
        return trainer_order_main(a)
    table = {"steps": a.steps, "precision": "fp32", "overrides": a.set, "date": time.strftime("%Y-%m-%d %H:%M"),
             "threads": torch.get_num_threads(), "runs": {}}
    with tempfile.TemporaryDirectory() as runs:
        for seed in a.seeds:
            rt, seen = run_routetune_recorded(seed, a.steps, Path(runs), a.set)
            hf = rr.run_hf(seed, 0.0, a.steps, "fp32", a.set, start=seen["start"], order=seen["blocks"])
            losses = {"routetune": seen["losses"], "hf": hf.pop("losses")}
            gap = max(abs(x - y) for x, y in zip(*losses.values()))
            table["runs"][str(seed)] = {"routetune": rt, "hf": hf, "losses": losses, "max_step_loss_gap": gap}
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(table, indent=2) + "\n")
            show = [0, 1, 9, a.steps - 1]
            print(f"seed {seed}: step losses (routetune / Trainer) " + ", ".join(
                f"{i + 1}: {losses['routetune'][i]:.4f} / {losses['hf'][i]:.4f}" for i in show if i < a.steps)
                + f"; largest gap {gap:.2e}", flush=True)
            print(f"seed {seed}: after, routetune / Trainer: " + ", ".join(
                f"{n} {rt[n]['after']:.3f} / {hf[n]['after']:.3f}" for n in (rr.TASK, rr.HELD)), flush=True)


if __name__ == "__main__":
    main()
