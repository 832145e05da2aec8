"""Plots for docs/routing.md: realised vs target shares of each routing strategy, and the
retention budget's control traces from the study's record (docs/records/budget_study.json:
real runs, made by bench/budget_study.py).

    .venv/bin/python scripts/plot_routing.py      # writes docs/img/routing-*.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from routetune.data.mixing import Schedule  # noqa: E402
from routetune.data.router import AdaptiveRouter, IIDRouter, InterleavedRouter  # noqa: E402

OUT = ROOT / "docs" / "img"
NAMES = ["task", "general"]
P = np.array([0.8, 0.2])


def realised(router, steps: int) -> np.ndarray:
    picks = np.array([router.choose(s, 1)[0] for s in range(steps)])
    return np.cumsum(picks == 1) / np.arange(1, steps + 1), picks


def plot_static() -> None:
    steps = 400
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, cls in (("iid", IIDRouter), ("interleaved", InterleavedRouter)):
        share, picks = realised(cls(NAMES, Schedule("constant", P), 13, steps), steps)
        a.plot(share, label=label)
        dev = np.cumsum(picks == 1) - P[1] * np.arange(1, steps + 1)
        b.plot(dev, label=label)
    a.axhline(P[1], color="k", ls="--", lw=1, label="target 0.2")
    a.set(title="realised share of 'general' (cumulative)", xlabel="step", ylim=(0, 0.5))
    b.axhline(1, color="k", ls=":", lw=1)
    b.axhline(-1, color="k", ls=":", lw=1)
    b.set(title="count minus target count", xlabel="step")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(OUT / "routing-static.png", dpi=100)


def plot_schedule() -> None:
    steps, window = 2000, 100
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind in ("linear", "cosine"):
        sch = Schedule(kind, np.array([0.5, 0.5]), np.array([0.9, 0.1]))
        _, picks = realised(InterleavedRouter(NAMES, sch, 0, steps), steps)
        windowed = np.convolve(picks == 1, np.ones(window) / window, mode="valid")
        ax.plot(
            np.arange(window // 2, steps - window // 2 + 1), windowed, label=f"{kind}: realised ({window}-step window)"
        )
        ax.plot([sch.at(s / steps)[1] for s in range(steps)], "k--" if kind == "linear" else "k:", lw=1,
                label=f"{kind}: target")
    ax.set(title="schedule: general 0.5 -> 0.1 (interleaved)", xlabel="step", ylabel="share of 'general'")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "routing-schedule.png", dpi=100)


def plot_adaptive() -> None:
    """Synthetic losses: the task loss falls as it is trained; the general loss creeps up
    (forgetting) while general text is not drawn, and falls back when it is."""
    steps = 600
    r = AdaptiveRouter(NAMES, Schedule("constant", P), 0, steps, eta=1.0, floor=0.05, smoothing=0.8,
                       update_every=10)
    task_seen, general_loss = 0, 3.0
    weights = []
    for s in range(steps):
        chosen = NAMES[r.choose(s, 1)[0]]
        if chosen == "task":
            task_seen += 1
            general_loss *= 1.003
            losses = {"task": 2.0 * 0.99 ** task_seen}
        else:
            general_loss = max(3.0, general_loss * 0.98)
            losses = {"general": general_loss}
        r.observe(s, losses)
        weights.append(r.probs.copy())
    w = np.array(weights)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, n in enumerate(NAMES):
        ax.plot(w[:, i], label=n)
    ax.set(title="adaptive (Exp3-style) weights on synthetic losses", xlabel="step", ylabel="probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "routing-adaptive.png", dpi=100)


def plot_budget() -> None:
    """The study's budgeted runs at +5%: the share and the measured change of the dev sample against
    the step, with the budget line. The controller as shipped (slack given away at a quarter speed,
    from the largest share) on the confirmation seeds in colour; the first round's controllers (full
    speed, from 10% or 30%) in grey."""
    record = ROOT / "docs" / "records" / "budget_study.json"
    if not record.is_file():
        return
    runs = json.loads(record.read_text())["runs"]
    traced = {k: r for k, r in runs.items() if r.get("trace") and k.split(":")[1] == "0.05"}
    if not traced:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    first = True
    for key, r in sorted(traced.items(), key=lambda kv: (kv[0].split(":")[0], int(kv[0].split(":")[2]))):
        kind, _, seed = key.split(":")
        if kind == "budget-safe" and seed != "0":
            style = {"label": f"shipped controller, seed {seed}"}
        elif kind in ("budget-v1", "budget-pid", "budget-fast", "budget-start"):
            style = {"color": "0.7", "linewidth": 0.8, "label": "first round (full-speed slack)" if first else None}
            first = False
        else:
            continue
        steps = [e["step"] for e in r["trace"]]
        top.step(steps, [e["share"] for e in r["trace"]], where="post", **style)
        bottom.plot(steps, [100 * e["change"] for e in r["trace"]], marker=".", **style)
    bottom.axhline(5, color="C3", linestyle="--", label="budget +5%")
    top.set(ylabel="general share", title="routing.budget on Tiny Shakespeare (smollm2-135m LoRA, 80 steps)")
    bottom.set(xlabel="step", ylabel="dev-sample perplexity change (%)")
    top.legend(fontsize=7)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "routing-budget.png", dpi=100)


def plot_budget_heldout() -> None:
    """The third round's dev runs at +2% (docs/records/budget_study_heldout.json): the share, and the
    change of the 32-block sample, of the witness sample (never acted on), the budget and what the
    controller aimed at (the budget less its margin for held-out text)."""
    record = ROOT / "docs" / "records" / "budget_study_heldout.json"
    if not record.is_file():
        return
    runs = json.loads(record.read_text())["runs"]
    traced = {k: r for k, r in runs.items() if k.endswith(":0") and r.get("trace")}
    if not traced:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for i, (key, r) in enumerate(sorted(traced.items())):
        kind, budget, _ = key.split(":")
        t, color = r["trace"], f"C{i}"
        steps = [e["step"] for e in t]
        top.step(steps, [e["share"] for e in t], where="post", color=color, label=kind)
        bottom.plot(steps, [100 * e["change"] for e in t], marker=".", color=color, label=f"{kind}: sample")
        bottom.plot(steps, [100 * e["witness_change"] for e in t], marker="x", linestyle="-.", color=color,
                    label=f"{kind}: witness (not acted on)")
        bottom.plot(steps[1:], [100 * (float(budget) - e["margin"]) for e in t[1:]], linestyle=":", color=color,
                    label=f"{kind}: aimed at (budget - margin)")
    bottom.axhline(2, color="C3", linestyle="--", label="budget +2%")
    top.set(ylabel="general share", title="routing.budget at +2% with a margin for held-out text (seed 0)")
    bottom.set(xlabel="step", ylabel="perplexity change (%)")
    top.legend(fontsize=7)
    bottom.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(OUT / "routing-budget-heldout.png", dpi=100)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    plot_static()
    plot_schedule()
    plot_adaptive()
    plot_budget()
    plot_budget_heldout()
    print("wrote", ", ".join(sorted(p.name for p in OUT.glob("routing-*.png"))))
