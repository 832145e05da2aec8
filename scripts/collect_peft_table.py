"""Print the docs/results.md PEFT table from runs/peft-*/summary.json and logs/peft-*.time
(written by scripts/peft_table.sh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["full", "top2", "head_only", "lora", "dora", "ia3", "adapter", "bitfit", "prompt", "prefix"]


def main() -> None:
    script = (ROOT / "scripts" / "peft_table.sh").read_text()
    print("| method | settings | trainable params | of which on the NER path | share | best dev F1 | test F1 | "
          "train tokens/s | train time | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ORDER:
        summary = ROOT / "runs" / f"peft-{name}" / "summary.json"
        if not summary.is_file():
            continue
        s = json.loads(summary.read_text())
        rss = (ROOT / "logs" / f"peft-{name}.time").read_text().split()[-1]
        settings = next(line.split('"')[1] for line in script.splitlines() if line.strip().startswith(f"[{name}]="))
        p = s["parameters"]
        lm_head = p["groups"].get("lm-head", {}).get("trainable", 0)  # no gradient with general routing 0
        print(f"| {name} | `{settings}` | {p['trainable']:,} | {p['trainable'] - lm_head:,} | "
              f"{100 * (p['trainable'] - lm_head) / p['total']:.2f}% | "
              f"{s['best']['value']:.4f} | **{s['test']['wnut17']['f1']:.4f}** | {s['tokens_per_s']:.0f} | "
              f"{s['train_seconds']:.0f} s | {int(rss) / 1024:.0f} MB |")


if __name__ == "__main__":
    sys.exit(main())
