"""WNUT-17 against a plain baseline with a tuned learning rate.

The WNUT-17 search (`routetune sweep examples/sweep-wnut17.yaml`, docs/results.md) compared its
chosen setting (14% general text at lr 1.2e-4) with plain fine-tuning left at lr 5e-5, although the
search showed that the learning rate decides F1. This runs plain fine-tuning (no general text) at
lr 1.2e-4, the learning rate the search found best at every share, with the confirmation's seeds
(1000-1002), the same data and the same test texts, so the two can be paired seed by seed. Plain
fine-tuning is given the outcome of routing's 16-trial search on the parameter that decides F1
without paying for it: if anything, this favours the baseline.

    .venv/bin/python bench/wnut_plain_tuned.py --jobs 2     # ~10 minutes a run with one thread

Each run's scores go to docs/records/wnut_plain_tuned.json as it finishes (a run in the record is
not rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("ROUTETUNE_DATA", str(ROOT.parent / "shared" / "data"))
SWEEP = ROOT / "examples" / "sweep-wnut17.yaml"
RECORD = ROOT / "docs" / "records" / "wnut_plain_tuned.json"
SEEDS, LR = (1000, 1001, 1002), 1.2e-4


def run_one(seed: int) -> dict:
    from replay_reference import from_sweep
    from routetune.workflow import train

    config, sets = from_sweep(SWEEP)
    with tempfile.TemporaryDirectory() as out:
        _, s = train(config, [*sets, "routing.weights.general=0.0", f"train.lr={LR}", f"train.seed={seed}",
                              f"routing.seed={seed}", "train.progress=false", f"run.output_dir={out}",
                              f"run.name=plain-{seed}"], overwrite=True, run_test=True)
    changes = {k.split("/")[0]: v["ratio"] - 1.0 for k, v in s["before_after"].items()
               if v.get("ratio") is not None and k.split("/")[0] in s["test"]}
    return {"lr": LR, "dev f1": s["best"]["value"], "test f1": s["test"]["wnut17"]["f1"], "change": changes,
            "train_seconds": s["train_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are split between them)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one seed, its scores on stdout
    a = ap.parse_args()
    if a.one is not None:
        import routetune  # noqa: F401  (first, as the CLI does)
        from routetune.logs import setup_logging

        setup_logging()
        print(json.dumps(run_one(a.one)))
        return
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {"runs": {}}
    lock = threading.Lock()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // a.jobs))}

    def child(seed: int) -> None:
        if str(seed) in record["runs"]:
            return
        proc = subprocess.run([sys.executable, __file__, "--one", str(seed)], capture_output=True, text=True,
                              env=env, cwd=ROOT)
        if proc.returncode != 0:
            print(f"seed {seed}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            return
        with lock:
            record["runs"][str(seed)] = json.loads(proc.stdout.strip().splitlines()[-1])
            RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print(f"seed {seed}: {record['runs'][str(seed)]}", flush=True)

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(child, SEEDS))


if __name__ == "__main__":
    main()
