"""Data-parallel scaling: the WNUT-17 example (its task source only, as the other bench scripts)
on 1 and on N processes of this machine, same global batch and steps.

    python bench/ddp_scaling.py --steps 60 --nproc 1 2 [--precision fp32]

Each setting runs under `torchrun --standalone` (gloo on CPUs, nccl on GPUs) with the machine's
cores shared out (OMP_NUM_THREADS = cores / processes). Rank 0 reports: tokens/s of the whole
run and per process, the median step time, and the share of the backward pass DistributedDataParallel
spent in its gradient all-reduce (its own runtime statistics: `avg_backward_comm_time` against
`avg_backward_compute_time`, sampled by DDP every few iterations). The first 5 steps are warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _runs import BENCH_SETTINGS  # noqa: E402


def worker(args) -> None:
    import routetune  # noqa: F401  (first, as the CLI does: it sets torch's allocator switch)
    from routetune.config import load_config
    from routetune.training import distributed
    from routetune.training.engine import Trainer
    from routetune.training.setup import prepare

    world = distributed.world()
    distributed.quiet_other_ranks(world)
    cfg = load_config(ROOT / "examples" / args.example, [*BENCH_SETTINGS, f"train.max_steps={args.steps}",
                                                          f"train.precision={args.precision}", "train.keep_last=1",
                                                          "train.save_every_minutes=null", *args.set])
    setup = prepare(cfg, world=world)
    times, tokens = [], []
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(setup, Path(out) if world.main else Path(out) / "x")
        step_fn = trainer.train_step

        def timed(step, parts):
            start = time.perf_counter()
            losses = step_fn(step, parts)
            times.append(time.perf_counter() - start)
            tokens.append(sum(p.n_tokens for p in parts))
            return losses

        trainer.train_step = timed
        trainer.run()
        stats = trainer.ddp._get_ddp_logging_data() if world.distributed else {}
    local = sum(tokens[5:])
    total = world.sum(__import__("torch").tensor([float(local)])).item()
    seconds = sum(times[5:])
    if world.main:
        comm, compute = stats.get("avg_backward_comm_time"), stats.get("avg_backward_compute_time")
        print(json.dumps({
            "processes": world.size, "threads": __import__("torch").get_num_threads(),
            "steps_timed": len(times) - 5, "median_step_s": statistics.median(times[5:]),
            "tokens_per_s": total / seconds, "tokens_per_s_per_process": total / seconds / world.size,
            "backward_comm_share": (comm / (comm + compute)) if comm and compute else None,
            "hardware": setup.hardware.describe()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", default="wnut17-minilm.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--set", action="append", default=[], help="a config override, e.g. peft.method=lora")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for n in args.nproc:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--example", args.example, "--steps", str(args.steps), "--precision", args.precision,
               *[x for s in args.set for x in ("--set", s)]]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
        if line is None:
            sys.exit(f"{n} processes failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line))
    hw = rows[0]["hardware"]
    print(f"{hw['cpu']} ({hw['cpu_capability']}), {hw['device']}, {args.precision}, torch {hw['torch']}"
          + (f", {' '.join(args.set)}" if args.set else ""))
    print(f"{'processes':>9} {'threads':>7} {'tokens/s':>9} {'per process':>11} {'step s':>7} {'comm share':>10}")
    for r in rows:
        share = f"{100 * r['backward_comm_share']:.0f}%" if r["backward_comm_share"] is not None else "-"
        print(f"{r['processes']:>9} {r['threads']:>7} {r['tokens_per_s']:>9.0f} {r['tokens_per_s_per_process']:>11.0f} "
              f"{r['median_step_s']:>7.3f} {share:>10}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
