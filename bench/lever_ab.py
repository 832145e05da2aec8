"""Same-process, interleaved A/B of two NER speed levers (issue #8).

    .venv/bin/python bench/lever_ab.py              # 240 steps, variants rotate every 2 steps
    .venv/bin/python bench/lever_ab.py --steps 400 --offset 1

One routetune training run of examples/wnut17-minilm.yaml (general routing 0) in which every
two steps the next of four variants is switched on:

* fast attention dropout on/off (model/attention.py; off = transformers' SDPA with torch's dropout)
* gradient clipping inside the fused AdamW step on/off (off = torch's clip_grad_norm_)

Whole-run A/B comparisons on this 2-core machine drift by 10-25% between runs (the machine's own
speed moves), which hides effects of a few percent; rotating variants step by step inside one
process puts every variant on the same machine state. Printed: microseconds per non-padding
token and tokens/s per variant over the timed steps (the first 8 are warm-up). `--offset` shifts
the rotation, so a variant meets other batches (lengths differ from batch to batch).
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--offset", type=int, default=0)
    args = ap.parse_args()

    from _runs import prepare_example, run_steps

    from routetune.model.attention import NAME

    setup = prepare_example("wnut17-minilm.yaml", args.steps)
    lm = setup.model.lm
    if lm.config._attn_implementation != NAME:
        sys.exit("fast attention dropout is not active for this model; nothing to compare")
    stats: dict[tuple[int, int], list] = {}

    def wrap(trainer, step_fn):
        def step(i, parts):
            variant = (i // 2 + args.offset) % 4
            attn, clip = variant & 1, variant >> 1
            lm.config._attn_implementation = NAME if attn else "sdpa"
            trainer.clip_in_optimizer = bool(clip)
            if not clip:
                trainer.optimizer.grad_scale = None
            t = time.perf_counter()
            result = step_fn(i, parts)
            seconds = time.perf_counter() - t
            if i >= 8:
                s = stats.setdefault((attn, clip), [0.0, 0, 0])
                s[0] += seconds
                s[1] += sum(p.n_tokens for p in parts)
                s[2] += 1
            return result

        return step

    run_steps(setup, wrap)
    base = stats[(0, 0)][1] / stats[(0, 0)][0]
    for (attn, clip), (seconds, tokens, n) in sorted(stats.items()):
        print(f"fast attention dropout {'on ' if attn else 'off'}  clip in AdamW {'on ' if clip else 'off'}  "
              f"steps {n:4d}  {1e6 * seconds / tokens:6.1f} us/token  {tokens / seconds:6.0f} tokens/s  "
              f"{tokens / seconds / base:.3f}x")


if __name__ == "__main__":
    main()
