"""After `make quickstart`: the test entity F1 it printed must be the README's figure.

    python scripts/check_quickstart.py [RUN]      (default runs/quickstart)

The README's first screen shows the quickstart's last lines; its `micro avg` row carries the test
F1 (the held-out loss's last digits depend on the CPU, the F1 does not). Exit 1 when they differ.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
run = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "quickstart"
readme = (ROOT / "README.md").read_text(encoding="utf-8")
match = re.search(r"^micro avg\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+\d+\s+<- task: test entity F1", readme, re.M)
if not match:
    sys.exit("README.md: no 'micro avg ... <- task: test entity F1' line in the quickstart's output")
expected = float(match.group(1))
summary = json.loads((run / "summary.json").read_text())
got = summary["test"]["news"]["f1"]
change = summary.get("before_after", {})
print(f"quickstart test F1 {got:.4f}, README {expected:.4f}; before -> after: {json.dumps(change)}")
if round(got, 4) != expected or not change:
    sys.exit("the quickstart's test F1 is not the README's figure (or no before/after retention was scored)")
