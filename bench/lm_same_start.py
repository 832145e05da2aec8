"""The causal-LM LoRA work of bench/quality_parity.py with the randomness taken out: routetune's
loop and the Hugging Face Trainer start from the same LoRA weights and train on the same blocks in
the same order, so what remains between them is the training loop itself (and, unless
``--set peft.dropout=0``, each side's LoRA-dropout masks).

    .venv/bin/python bench/lm_same_start.py --seeds 1 2 3                      # LoRA dropout 0.05
    .venv/bin/python bench/lm_same_start.py --seeds 1 --set peft.dropout=0     # no random draw at all

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--set", action="append", default=["evals.wikitext.max_blocks=40"], metavar="KEY=VALUE",
                    help="Config override for both sides (default: evals.wikitext.max_blocks=40, as quality_parity)")
    ap.add_argument("--out", type=Path, default=rr.ROOT / "runs" / "lm_same_start.json")
    a = ap.parse_args()
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
