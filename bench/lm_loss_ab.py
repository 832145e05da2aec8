"""Same-process, step-by-step A/B of the chunked causal-LM loss (issue #8, `train.fused_lm_loss`).

    .venv/bin/python bench/lm_loss_ab.py              # 50 steps, the variant alternates every step
    .venv/bin/python bench/lm_loss_ab.py --steps 80

One routetune training run of examples/shakespeare-smollm2.yaml (smollm2-135m, LoRA, 8 x 128
tokens, bf16, general routing 0) in which the causal-LM loss alternates step by step between
model/lm_loss.py and transformers' own loss (full fp32 vocabulary logits). Every batch has the
same shape (full 128-token blocks), so neighbouring steps do the same work; whole-run A/B
comparisons on this 2-core machine drift by 10-25% between runs, step pairs inside one process
share the machine's state. Printed: mean and median seconds per step of each variant, and the
median (with quartiles) of the ratio within each pair of neighbouring steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps not timed")
    args = ap.parse_args()

    from _runs import prepare_example, run_steps

    setup = prepare_example("shakespeare-smollm2.yaml", args.steps)
    model = setup.model
    if model._plain_lm_head() is None:
        sys.exit("the chunked loss is not used for this model; nothing to compare")
    times: dict[bool, list[float]] = {True: [], False: []}

    def wrap(trainer, original):
        def step(i, parts):
            fused = i % 2 == 1
            model.fused_lm_loss = fused
            t = time.perf_counter()
            losses = original(i, parts)
            if i >= args.skip:
                times[fused].append(time.perf_counter() - t)
            return losses

        return step

    run_steps(setup, wrap)
    for fused, label in ((False, "transformers' loss"), (True, "chunked loss (lm_loss.py)")):
        ts = times[fused]
        print(f"{label:28s} {len(ts)} steps  mean {statistics.mean(ts):.3f} s  median {statistics.median(ts):.3f} s")
    pairs = sorted(a / b for a, b in zip(times[False], times[True]))
    q = statistics.quantiles(pairs, n=4)
    print(f"speed-up, neighbouring step pairs: median {statistics.median(pairs):.3f}x "
          f"(quartiles {q[0]:.3f}-{q[2]:.3f}, {len(pairs)} pairs); "
          f"ratio of means {statistics.mean(times[False]) / statistics.mean(times[True]):.3f}x")


if __name__ == "__main__":
    main()
