"""Print the ablation table of docs/benchmarks.md from logs/ablation-*.json (bench/ablation.sh)."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["all-on", "fused-off", "fast-dropout-off", "group-by-length-off", "bf16-frozen-off", "sdpa-attention", "fp32"]


def main() -> None:
    rows = {n: json.loads((ROOT / "logs" / f"ablation-{n}.json").read_text())
            for n in ORDER if (ROOT / "logs" / f"ablation-{n}.json").is_file()}
    base = rows.get("all-on")
    print("| variant | override | NER tokens/s | vs all levers on | causal-LM tokens/s | vs all levers on |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        ner, clm = r["ner"]["routetune"]["tokens_per_s"], r["clm"]["routetune"]["tokens_per_s"]
        rel = (
            (
                f"{ner / base['ner']['routetune']['tokens_per_s']:.2f}x",
                f"{clm / base['clm']['routetune']['tokens_per_s']:.2f}x",
            )
            if base
            else ("-", "-")
        )
        print(f"| {name} | `{' '.join(r['overrides']) or '-'}` | {ner:.0f} | {rel[0]} | {clm:.0f} | {rel[1]} |")


if __name__ == "__main__":
    main()
