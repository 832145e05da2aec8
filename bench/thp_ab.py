"""Same-process, interleaved A/B of huge pages for torch's large CPU buffers (issue #8).

    .venv/bin/python bench/thp_ab.py              # 240 WNUT-17 steps, variants alternate every 2 steps
    .venv/bin/python bench/thp_ab.py --steps 400 --offset 1

routetune switches on torch's THP allocation (routetune/__init__.py sets THP_MEM_ALLOC_ENABLE,
which torch reads once per process), so the A/B toggles the kernel side instead: every two
steps prctl(PR_SET_THP_DISABLE) forbids or allows huge pages for the buffers allocated next.
One routetune training run of examples/wnut17-minilm.yaml (general routing 0); printed per
variant: microseconds per non-padding token, tokens/s and minor page faults per step over the
timed steps (the first 8 are warm-up). Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import time

PR_SET_THP_DISABLE = 41


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--offset", type=int, default=0)
    args = ap.parse_args()

    from _runs import prepare_example, run_steps

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    setup = prepare_example("wnut17-minilm.yaml", args.steps)
    stats = {False: [0.0, 0, 0, 0], True: [0.0, 0, 0, 0]}  # seconds, tokens, faults, steps

    def wrap(trainer, step_fn):
        def timed(i, parts):
            huge = ((i + args.offset) // 2) % 2 == 1
            if libc.prctl(PR_SET_THP_DISABLE, 0 if huge else 1, 0, 0, 0) != 0:
                sys.exit("prctl(PR_SET_THP_DISABLE) failed: not Linux, or a kernel without it")
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            result = step_fn(i, parts)
            if i >= 8:
                s = stats[huge]
                s[0] += time.perf_counter() - t
                s[1] += sum(p.n_tokens for p in parts)
                s[2] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                s[3] += 1
            return result

        return timed

    run_steps(setup, wrap)
    for huge, (sec, tok, faults, k) in stats.items():
        print(f"huge pages {'on ' if huge else 'off'}: {1e6 * sec / tok:.1f} us/token  {tok / sec:.0f} tokens/s  "
              f"{faults / k:.0f} page faults/step  ({k} steps)")
    on, off = stats[True], stats[False]
    print(f"speed on/off: {(on[1] / on[0]) / (off[1] / off[0]):.3f}x")


if __name__ == "__main__":
    main()
