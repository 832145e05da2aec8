"""Memory per process of data-parallel (DDP) and sharded (FSDP) training: random-weight decoders in
SmolLM2's shapes (bench/model_scaling.py's configs, no download), full fine-tuning and LoRA, on 1
process and on N, a few steps of causal-LM training on Tiny Shakespeare.

    python bench/fsdp_memory.py --sizes 360M --methods full lora --settings ddp:1 ddp:2 fsdp:2 \\
        --json docs/records/fsdp_memory.json

Each setting runs routetune's own Trainer under `torchrun --standalone` (gloo on CPUs) with the
machine's cores shared out. Every rank reports, after its last step: the bytes it holds of the
parameters, of their gradients and of the optimizer state (its local shards under FSDP: what the
sharding divides; gradients are counted as the trainable parameters' size, which each step's
gradients have before the optimizer frees them), and its peak RSS over the whole process
(loading the full model first, the steps, a checkpoint). Rank 0 prints the rows; the table shows the largest rank.

With `--limit-gb G` every process runs in a Linux memory cgroup of its own limited to G GiB (as a
GPU limits each process's memory; needs root and the cgroup memory controller, v1 or v2): a setting
whose process outgrows it is killed by the kernel and reported as over the limit, which gives the
largest shape each strategy trains in a fixed memory per process:

    python bench/fsdp_memory.py --sizes 135M 360M --methods full --settings ddp:1 ddp:2 fsdp:2 \
        --limit-gb 7.5 --json docs/records/fsdp_memory_limit.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from model_scaling import SHAPES, make_model  # noqa: E402

DATA = Path(os.environ.get("ROUTETUNE_DATA", ROOT.parent / "shared" / "data"))
CGROUPS = Path("/sys/fs/cgroup")


def _cgroup(launcher: int, rank: int) -> tuple[Path, str, str]:
    """The memory cgroup of one process of one launch (folder, limit file, peak file): v1 or v2."""
    if (CGROUPS / "memory" / "memory.limit_in_bytes").exists():  # v1
        return CGROUPS / "memory" / f"rt-bench-{launcher}-{rank}", "memory.limit_in_bytes", "memory.max_usage_in_bytes"
    return CGROUPS / f"rt-bench-{launcher}-{rank}", "memory.max", "memory.peak"


def confine(limit_gb: float, rank: int) -> None:
    """This process (a rank, child of the launcher) into a memory cgroup of its own, limited to
    `limit_gb` GiB, before anything is allocated: the kernel kills it if it needs more."""
    folder, limit, _ = _cgroup(os.getppid(), rank)
    folder.mkdir()
    (folder / limit).write_text(str(int(limit_gb * 2**30)))
    (folder / "cgroup.procs").write_text(str(os.getpid()))


def release(launcher: int, n: int) -> list[dict]:
    """Each rank's cgroup peak and whether it hit the limit; the (empty) cgroups removed."""
    out = []
    for rank in range(n):
        folder, limit, peak = _cgroup(launcher, rank)
        if not folder.is_dir():
            continue
        used = int((folder / peak).read_text()) if (folder / peak).exists() else None
        cap = int((folder / limit).read_text())
        out.append({"rank": rank, "cgroup_peak_mb": used / 2**20 if used is not None else None,
                    "limit_mb": cap / 2**20, "at_limit": used is not None and used >= cap - 2**20})
        folder.rmdir()  # made by confine() above; empty once its process has ended
    return out


def _bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def worker(args) -> None:
    if args.limit_gb:
        confine(args.limit_gb, int(os.environ["LOCAL_RANK"]))
    import routetune  # noqa: F401  (first, as the CLI does: it sets torch's allocator switch)
    import torch
    from routetune.config import load_config
    from routetune.training import distributed
    from routetune.training.engine import Trainer
    from routetune.training.setup import prepare

    world = distributed.world()
    distributed.quiet_other_ranks(world)
    sets = [f"model.name={args.model}", f"model.max_length={args.length}", f"train.max_steps={args.steps}",
            f"train.batch_size={args.tokens // args.length}", f"train.distributed.strategy={args.strategy}",
            "train.lr=2e-4", "train.weight_decay=0", "train.eval_each_epoch=false", "train.eval_before=false",
            "train.progress=false", "train.log_every=1000000", "train.keep_last=1", "train.seed=42",
            f"sources.shakespeare.train={DATA / 'tinyshakespeare' / 'input.txt'}"]
    if args.method == "lora":
        sets += ["peft.method=lora", "peft.r=8", "peft.alpha=16", "peft.dropout=0.05",
                 "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]"]
    with tempfile.TemporaryDirectory() as out:
        cfg_path = Path(out) / "config.yaml"
        cfg_path.write_text("sources: {shakespeare: {objective: causal-lm, text: {stream: false}}}\n"
                            f"run: {{name: mem, output_dir: {out}}}\n")
        setup = prepare(load_config(cfg_path, sets), world=world)
        (Path(out) / "mem").mkdir()
        trainer = Trainer(setup, Path(out) / "mem")
        trainer.run()
        params = list(trainer.model.parameters())
        state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        row = {"rank": world.rank, "processes": world.size, "strategy": args.strategy,
               "params_mb": _bytes(params) / 2**20, "grads_mb": _bytes(p for p in params if p.requires_grad) / 2**20,
               "optimizer_mb": _bytes(state) / 2**20,
               "trainable": sum(p.numel() for p in params if p.requires_grad),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "precision": setup.hardware.precision, "cpu": setup.hardware.describe().get("cpu")}
    rows = world.gather(row)
    if world.main:
        print("ROWS " + json.dumps(rows), flush=True)


def measure(size: str, method: str, strategy: str, n: int, folder: Path, args) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", "--model", str(folder), "--method", method, "--strategy", strategy,
           "--steps", str(args.steps), "--tokens", str(args.tokens), "--length", str(args.length),
           *(["--limit-gb", str(args.limit_gb)] if args.limit_gb else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate()
    limits = release(proc.pid, n) if args.limit_gb else []
    line = next((x for x in stdout.splitlines() if x.startswith("ROWS ")), None)
    if line is None:
        over = any(x["at_limit"] for x in limits)
        print(f"{size} {method} {strategy}:{n} {'over the limit' if over else 'failed'}:\n{stderr[-800:]}",
              file=sys.stderr)
        return [{"failed": proc.returncode, "over_limit": over, "size": size, "method": method,
                 "strategy": strategy, "processes": n, "cgroups": limits}]
    rows = json.loads(line[5:])
    for r in rows:
        r.update(next((x for x in limits if x["rank"] == r["rank"]), {}))
    return [{**r, "size": size, "method": method} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["360M"], choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--settings", nargs="+", default=["ddp:1", "ddp:2", "fsdp:2"], help="STRATEGY:PROCESSES")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per global step")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--limit-gb", type=float, help="each process in a memory cgroup of its own, limited to this")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    print(f"{'shape':>6} {'method':>6} {'setting':>8} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} "
          f"{'peak RSS MB':>11}   (per rank: the largest)")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            folder = Path(tmp) / size
            make_model(size, folder)
            for method in args.methods:
                for setting in args.settings:
                    strategy, n = setting.split(":")
                    got = measure(size, method, strategy, int(n), folder, args)
                    rows += got
                    if "failed" in got[0]:
                        what = "over the limit" if got[0]["over_limit"] else "failed"
                        print(f"{size:>6} {method:>6} {setting:>8} {what}", flush=True)
                        continue
                    top = max(got, key=lambda r: r["peak_rss_mb"])
                    print(f"{size:>6} {method:>6} {setting:>8} {top['params_mb']:>10.0f} {top['grads_mb']:>9.0f} "
                          f"{top['optimizer_mb']:>9.0f} {top['peak_rss_mb']:>11.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "steps": args.steps, "tokens": args.tokens,
                                         "length": args.length, "limit_gb": args.limit_gb, "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
