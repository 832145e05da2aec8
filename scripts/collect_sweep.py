"""Print the Shakespeare routing table of docs/results.md from runs/shakespeare-smollm2-* and
runs/sweep-* (summary.json before/after) with the overrides each run used (config.yaml)."""

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def describe(cfg: dict) -> str:
    r = cfg["routing"]
    others = [n for n in cfg["sources"] if n != "shakespeare"]
    weights = " + ".join(f"{n} {r['weights'].get(n, 0):g}" for n in others)
    parts = [f"{r['strategy']}", weights]
    if (r.get("schedule") or {}).get("kind", "constant") != "constant":
        s = r["schedule"]
        parts.append(f"{s['kind']} to " + " + ".join(f"{n} {s['end'].get(n, 0):g}" for n in others))
    for name, w in (r.get("loss_weights") or {}).items():
        parts.append(f"loss weight {name} {w:g}")
    distilled = {n: d for n in others if (d := cfg["sources"][n].get("distill", 0))}
    if distilled:
        if set(distilled.values()) == {1.0}:
            parts.append(f"{', '.join(distilled)} distilled (KL to base)")
        else:
            parts.append(", ".join(f"{n} distilled {d:g}" for n, d in distilled.items()))
    parts.append(f"per {r['granularity']}")
    return ", ".join(parts)


def main(names: list[str]) -> None:
    runs = (
        [ROOT / "runs" / n for n in names]
        if names
        else sorted((ROOT / "runs").glob("shakespeare-smollm2-*"))
        + sorted(
            (ROOT / "runs").glob("sweep-*"),
            key=lambda p: (p / "config.yaml").stat().st_mtime if (p / "config.yaml").exists() else 0,
        )
    )
    # HF reference (docs/results.md, Tiny Shakespeare): 25% replay domain 57.96 -> 37.80 (ratio 0.6522), general +1.8%;
    # sweep goal: domain <= 37.5 (ratio 0.6470 of the same base) and general under +1.0%.
    print("| run | routing | domain ppl before -> after (ratio) | general (WikiText-2) ppl before -> after | "
          "general change | at least the HF 25% bar | sweep goal |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        if not (run / "summary.json").is_file():
            continue
        s = json.loads((run / "summary.json").read_text())
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        d, g = s["before_after"]["shakespeare/perplexity"], s["before_after"]["wikitext/perplexity"]
        change = 100 * (g["ratio"] - 1)
        bar = d["ratio"] <= 37.80 / 57.96 and change <= 1.8
        goal = d["ratio"] <= 37.5 / 57.96 and change < 1.0
        print(f"| {run.name} | {describe(cfg)} | {d['before']:.2f} -> **{d['after']:.2f}** ({d['ratio']:.4f}) | "
              f"{g['before']:.2f} -> **{g['after']:.2f}** | {change:+.2f}% | {'yes' if bar else 'no'} | "
              f"{'yes' if goal else 'no'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
