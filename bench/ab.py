"""Same-process A/B of one speed lever: the lever is switched on and off every `--every` steps inside
one routetune training run, so both variants share the machine's state.

    .venv/bin/python bench/ab.py --lever attention-dropout         # 240 WNUT-17 steps
    .venv/bin/python bench/ab.py --lever fused-clip --offset 1     # the other phase of the rotation
    .venv/bin/python bench/ab.py --lever huge-pages
    .venv/bin/python bench/ab.py --lever lm-loss --steps 30 --every 1

Levers:

* ``attention-dropout``: routetune's attention with fast dropout on the probabilities
  (model/attention.py) against transformers' SDPA with torch's dropout (WNUT-17, minilm-l6).
* ``fused-clip``: gradient clipping inside the fused AdamW step against torch's clip_grad_norm_
  (WNUT-17, minilm-l6).
* ``huge-pages``: transparent huge pages for this process on and off (prctl PR_SET_THP_DISABLE;
  Linux only), with the minor page faults per step (WNUT-17, minilm-l6).
* ``per-example-attention`` (WNUT-17 NER, minilm-l6), ``per-example-attention-cls`` (sentence
  polarity, minilm-l6), ``per-example-attention-lm`` (Tiny Shakespeare, smollm2-135m LoRA: blocks
  of one length, so only the loop's cost shows): `train.packed_attention=per_example`, each
  example's attention on its own length, against the padded width (model/packing.py).
* ``lm-loss``: the chunked causal-LM loss (model/lm_loss.py) against transformers' loss
  (Tiny Shakespeare, smollm2-135m LoRA).

Whole-run A/B comparisons on a small shared machine drift by 10-25% between runs, which hides
effects of a few percent; alternating inside one run does not. Printed per variant: microseconds
per non-padding token, tokens/s and minor page faults per step over the timed steps (the first
`--skip` are warm-up), the ratio of on to off, and the median of neighbouring step-pair ratios.
`--offset` shifts the rotation so that each variant meets other batches.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import sys
import time

PR_SET_THP_DISABLE = 41


def _attention(setup, trainer, on: bool) -> None:
    from routetune.model.attention import NAME

    setup.model.lm.config._attn_implementation = NAME if on else "sdpa"


def _fused_clip(setup, trainer, on: bool) -> None:
    trainer.clip_in_optimizer = on
    if not on:
        trainer.optimizer.grad_scale = None


def _huge_pages(setup, trainer, on: bool) -> None:
    if ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_THP_DISABLE, 0 if on else 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_THP_DISABLE) failed: not Linux, or a kernel without it")


def _lm_loss(setup, trainer, on: bool) -> None:
    setup.model.fused_lm_loss = on


def _per_example(setup, trainer, on: bool) -> None:
    setup.model.packed_attention = "per_example" if on else "padded"


def _has_fast_attention(setup) -> bool:
    from routetune.model.attention import NAME

    return setup.model.lm.config._attn_implementation == NAME


LEVERS = {  # name: (example, switch, a check that the lever applies to the example's model)
    "attention-dropout": ("wnut17-minilm.yaml", _attention, _has_fast_attention),
    "fused-clip": ("wnut17-minilm.yaml", _fused_clip, lambda s: True),
    "huge-pages": ("wnut17-minilm.yaml", _huge_pages, lambda s: True),
    "lm-loss": ("shakespeare-smollm2.yaml", _lm_loss, lambda s: s.model._plain_lm_head() is not None),
    "per-example-attention": ("wnut17-minilm.yaml", _per_example, lambda s: s.model.padding_free),
    "per-example-attention-cls": ("polarity-minilm.yaml", _per_example, lambda s: s.model.padding_free),
    "per-example-attention-lm": ("shakespeare-smollm2.yaml", _per_example, lambda s: s.model.padding_free),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lever", required=True, choices=sorted(LEVERS))
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--every", type=int, default=2, help="steps before the lever is switched")
    ap.add_argument("--offset", type=int, default=0, help="shift the rotation by this many phases")
    ap.add_argument("--skip", type=int, default=8, help="warm-up steps not timed")
    args = ap.parse_args()

    from _runs import prepare_example, run_steps

    example, switch, applies = LEVERS[args.lever]
    setup = prepare_example(example, args.steps)
    if not applies(setup):
        sys.exit(f"{args.lever} does not apply to {example}'s model; nothing to compare")
    steps: dict[bool, list[tuple[int, float, int, int]]] = {True: [], False: []}  # (step, seconds, tokens, faults)

    def wrap(trainer, step_fn):
        def step(i, parts):
            on = (i // args.every + args.offset) % 2 == 1
            switch(setup, trainer, on)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            result = step_fn(i, parts)
            if i >= args.skip:
                steps[on].append((i, time.perf_counter() - t, sum(p.n_tokens for p in parts),
                                  resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
            return result

        return step

    run_steps(setup, wrap)
    speed = {}
    for on in (False, True):
        rows = steps[on]
        seconds, tokens = sum(r[1] for r in rows), sum(r[2] for r in rows)
        speed[on] = tokens / seconds
        print(f"{args.lever} {'on ' if on else 'off'}: {len(rows)} steps  {1e6 * seconds / tokens:.1f} us/token  "
              f"{speed[on]:.0f} tokens/s  {sum(r[3] for r in rows) / len(rows):.0f} page faults/step")
    # neighbouring steps (one of each variant) compared pair by pair: speed on / speed off
    pairs = sorted((off[1] / off[2]) / (on[1] / on[2]) for off, on in zip(steps[False], steps[True]))
    q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    print(f"speed on/off: {speed[True] / speed[False]:.3f}x; neighbouring step pairs: median "
          f"{statistics.median(pairs):.3f}x (quartiles {q[0]:.3f}-{q[2]:.3f}, {len(pairs)} pairs)")


if __name__ == "__main__":
    main()
