"""The retention-budget study: does `routing.budget` hold a stated budget on general English, and
how does its domain result compare with tuned fixed-mixture and plain fine-tuning baselines?

    .venv/bin/python bench/budget_study.py plan --jobs 2       # everything, most important first
    .venv/bin/python bench/budget_study.py search --jobs 2     # dev: the baselines' searches (seed 0)
    .venv/bin/python bench/budget_study.py confirm --jobs 2    # test: 5 new seeds of every method per budget
    .venv/bin/python bench/budget_study.py table               # the tables of docs/results.md
    BUDGET_STUDY_RECORD=docs/records/budget_study_heldout.json \
        .venv/bin/python bench/budget_study.py heldout             # the third round's tables

Work: examples/shakespeare-smollm2-budget.yaml (smollm2-135m, LoRA r=8 on q,k,v,o, 80 steps of 8
blocks of 64 tokens, lr 4e-4, Tiny Shakespeare with its last 5% as test and the 2% before as dev;
general text: Project Gutenberg novels, causal-LM). General ability: perplexity on WikiText-2 test,
its first half as dev text (the budget's measure and the baselines' selection), its second half
as test text (judged, never used for a decision). Budgets: +2% and +5% perplexity.

Methods, each given the same seeds:
* ``budget-safe B``: routing.budget with max_change B as the example ships it (from the largest
  share, slack given away at a quarter speed); nothing is searched. (The first round's controllers,
  ``budget-v1``, ``-pid``, ``-fast``, ``-start``, gave slack away at full speed from 10% or 30%.)
* ``fixed S``: routetune with a fixed general share S; the search tries SHARES on dev (seed 0)
  and takes, per budget, the share with the best domain dev perplexity among those whose dev
  general change is within the budget.
* ``lr L``: plain fine-tuning (no general text) at learning rate L; the same number of trials
  (LRS) chosen by the same rule: a user can also hold forgetting back by training more gently.
* ``hf S``: the Hugging Face recipe (datasets.interleave_datasets with fixed probabilities +
  Trainer, bench/replay_reference.py) at the share the fixed-share search chose.

Every run is a child process (`--jobs` at a time, the cores split between them); each run's
scores go to docs/records/budget_study.json as it finishes, so an interrupted study continues
where it stopped (a run in the record is not rerun). The equivalence margin and the seeds are in
docs/results.md, written before the confirmation runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("ROUTETUNE_DATA", str(ROOT.parent / "shared" / "data"))
CONFIG = ROOT / "examples" / "shakespeare-smollm2-budget.yaml"
RECORD = Path(os.environ.get("BUDGET_STUDY_RECORD", ROOT / "docs" / "records" / "budget_study.json"))
TASK, GENERAL, DEV, TEST = "shakespeare", "general", "wikitext-dev", "wikitext"
BUDGETS = (0.02, 0.05)
SHARES = (0.0, 0.15, 0.3, 0.45, 0.6)
LRS = (5e-5, 1e-4, 2e-4, 4e-4, 8e-4)
SEARCH_SEED, SEEDS = 0, (6, 7, 8, 9, 10)  # confirmation seeds (1 and 2 went to the first controller)
NO_BUDGET = "routing.budget=null"
CONFIG_LR = 4e-4  # the example's: plain fine-tuning at it is the fixed share 0


def canonical(spec: str) -> str:
    """One name per run: the value as Python writes the float (`lr:2e-4:0` is `lr:0.0002:0`), and
    `lr:4e-4:S` is the same run as `fixed:0.0:S`."""
    kind, value, seed = spec.split(":")
    return f"fixed:0.0:{seed}" if kind == "lr" and float(value) == CONFIG_LR else f"{kind}:{float(value)}:{seed}"


FIRST = ("routing.budget.slack_gain=1",)  # the first round's controllers gave slack away at full speed
GAINS = {"budget-v1": ("integral_gain=0.3", "proportional_gain=0.5", "derivative_gain=0"),
         "budget-pid": ("integral_gain=0.5", "proportional_gain=0.5", "derivative_gain=1.0"),
         "budget-fast": ("integral_gain=0.8", "proportional_gain=1.0", "derivative_gain=0")}
"""The first round: the first version's gains and the two candidates tried on dev (seed 0) after
it, each from a 10% start share."""
SAFE = {"budget-safe": 0.25, "budget-safer": 0.1}
"""The second round's candidates: started at the largest share (0.6), giving it away at this
fraction of the speed it is taken back (`slack_gain`); the first gains otherwise. `budget-safe`
was chosen on dev and is what the example ships (its defaults)."""
BUDGET = "budget-safe"
OLD = ("routing.budget.sample=first", "routing.budget.confidence=null", "routing.budget.slack_warmup=0",
       "routing.budget.blocks=16")
"""What the first two rounds measured with: the sample's first 16 blocks, acting on the sample itself,
slack acting from the first step (defaults then)."""
HELDOUT = {"budget-margin": 0.0, "budget-margin-warm": 1.0}
"""The third round (held-out text): 32 blocks spread across the dev half, a witness sample of 16
others, a margin at 90% confidence for a held-out text of 100 blocks; slack acting from the start
(`budget-margin`) or in proportion to the run's progress (`-warm`, slack_warmup 1.0). Chosen on dev
(seed 0, +2%), confirmed on seeds 11-15 against the fixed shares chosen in the first round."""
HELDOUT_SETS = ("routing.budget.sample=spread", "routing.budget.blocks=32", "routing.budget.witness_blocks=16",
                "routing.budget.confidence=0.9", "routing.budget.holdout_blocks=100")
HELDOUT_SEEDS = (11, 12, 13, 14, 15)


def overrides(kind: str, value: float, seed: int) -> list[str]:
    base = [f"train.seed={seed}", f"routing.seed={seed}", "train.progress=false", f"routing.budget.max_change={value}"]
    if kind in HELDOUT:  # the confirmation seeds measure no witness: it is never acted on (the same control)
        witness = ["routing.budget.witness_blocks=0"] if seed in HELDOUT_SEEDS else []
        return [*base, *HELDOUT_SETS, *witness, f"routing.budget.slack_warmup={HELDOUT[kind]}",
                "routing.budget.slack_gain=0.25", f"routing.weights={{{TASK}: 0.4, {GENERAL}: 0.6}}"]
    if kind == "budget-start":  # the first controller started at the share the fixed search chose for +5%
        return [*base, *OLD, *FIRST, f"routing.weights={{{TASK}: 0.7, {GENERAL}: 0.3}}"]
    if kind in SAFE:
        return [*base, *OLD, f"routing.budget.slack_gain={SAFE[kind]}",
                f"routing.weights={{{TASK}: 0.4, {GENERAL}: 0.6}}"]
    if kind in GAINS:
        return [*base, *OLD, *FIRST, *(f"routing.budget.{g}" for g in GAINS[kind]),
                f"routing.weights={{{TASK}: 0.9, {GENERAL}: 0.1}}"]
    base = base[:3]
    if kind in ("fixed", "hf"):
        return [*base, NO_BUDGET, f"routing.weights={{{TASK}: {1 - value}, {GENERAL}: {value}}}"]
    if kind == "lr":
        return [*base, NO_BUDGET, f"routing.weights={{{TASK}: 1.0, {GENERAL}: 0.0}}", f"train.lr={value}"]
    raise ValueError(kind)


def run_one(spec: str) -> dict:
    """One run in this process: `kind:value:seed` -> its dev and test scores."""
    kind, value, seed = spec.split(":")
    value, seed = float(value), int(seed)
    sets = overrides(kind, value, seed)
    if kind == "hf":
        import replay_reference as rr
        from routetune.device import resolve

        precision = resolve("cpu", "auto").precision
        r = rr.run_hf(seed, value, 80, precision, [NO_BUDGET], config=CONFIG)
        return {"test": {TASK: r[TASK]["after"]}, "change": {TEST: r[TEST]["after"] / r[TEST]["before"] - 1},
                "train_seconds": r["seconds"]}
    from routetune.workflow import train

    with tempfile.TemporaryDirectory() as out:
        _, s = train(CONFIG, [*sets, f"run.output_dir={out}", f"run.name={kind}-{value}-{seed}"], overwrite=True,
                     run_test=True)
        lines = (Path(s["run"]) / "metrics.jsonl").read_text().splitlines()
        events = [json.loads(x) for x in lines]
    dev = [e["metrics"][f"{TASK}/perplexity"] for e in events if e["event"] == "eval"][-1]
    ba = s["before_after"]
    trace = [e for e in events if e["event"] == "budget"]
    out = {"dev": {TASK: dev}, "test": {TASK: s["test"][TASK]["perplexity"]},
           "change": {n: ba[f"{n}/perplexity"]["ratio"] - 1 for n in (DEV, TEST)},
           "train_seconds": s["train_seconds"], "wall_seconds": s["wall_seconds"]}
    if trace:
        keep = ("step", "change", "share", "seconds", "margin", "bound", "witness_change")
        out["trace"] = [{k: e[k] for k in keep if k in e} for e in trace]
    return out


# ---------------------------------------------------------------------------------------------- the driver
def load() -> dict:
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {"runs": {}}
    record["runs"] = {canonical(k): v for k, v in record.get("runs", {}).items()}
    return record


def run_all(specs: list[str], jobs: int) -> None:
    record, lock = load(), threading.Lock()
    specs = list(dict.fromkeys(map(canonical, specs)))
    todo = [s for s in specs if s not in record["runs"]]
    print(f"{len(todo)} run(s) to do, {len(specs) - len(todo)} in the record", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // jobs))}

    def child(spec: str) -> None:
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "one", spec], capture_output=True, text=True, env=env,
                              cwd=ROOT)
        if proc.returncode != 0:
            print(f"{spec}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            return
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        with lock:
            record.setdefault("runs", {})[spec] = result
            record["machine"] = _machine()
            RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{spec}: {json.dumps({k: result[k] for k in ('test', 'change')})} ({time.time() - t0:.0f} s)",
              flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(child, todo))


def _machine() -> str:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"


def search_specs() -> list[str]:
    """Seed 0: the fixed shares (plain fine-tuning first: the check that the work forgets) and the
    learning rates."""
    return [f"fixed:{s}:{SEARCH_SEED}" for s in SHARES] + [f"lr:{lr}:{SEARCH_SEED}" for lr in LRS]


def plan_specs(record: dict) -> list[str]:
    """The order the study runs in when compute is short: the forgetting check, the budgeted runs
    at +5% (nothing to search), the fixed-share search, the fixed share chosen for +5%, the budgeted
    runs at +2%, then the rest of the confirmation (learning rates, the Hugging Face recipe)."""
    first = [f"fixed:0.0:{SEARCH_SEED}", *(f"{BUDGET}:0.05:{s}" for s in SEEDS[:2])]
    middle = [*(f"fixed:{v}:{SEARCH_SEED}" for v in SHARES[1:]), *(f"{BUDGET}:0.05:{s}" for s in SEEDS[2:])]
    share = choose(record, "fixed", SHARES, 0.05)
    chosen = [f"fixed:{share}:{s}" for s in SEEDS] if share is not None else []
    return list(dict.fromkeys([*first, *middle, *chosen, *(f"{BUDGET}:0.02:{s}" for s in SEEDS),
                               *search_specs(), *confirm_specs(record)]))


def choose(record: dict, kind: str, values, budget: float) -> float | None:
    """The trial with the best domain dev perplexity among those within the budget on dev text."""
    ok = [(r["dev"][TASK], v) for v in values if (r := record["runs"].get(canonical(f"{kind}:{v}:{SEARCH_SEED}")))
          and r["change"][DEV] <= budget]
    return min(ok)[1] if ok else None


def confirm_specs(record: dict) -> list[str]:
    """Every method's seeds per budget, in the order they matter: the budgeted runs, then the fixed
    mixture it is compared with, then plain fine-tuning, then the Hugging Face recipe."""
    chosen = {b: (choose(record, "fixed", SHARES, b), choose(record, "lr", LRS, b)) for b in BUDGETS}
    specs = [f"{BUDGET}:{b}:{s}" for b in BUDGETS for s in SEEDS]
    for kind, pick in (("fixed", 0), ("lr", 1), ("hf", 0)):
        specs += [f"{kind}:{chosen[b][pick]}:{s}" for b in BUDGETS if chosen[b][pick] is not None for s in SEEDS]
    return list(dict.fromkeys(specs))


def table(record: dict) -> None:
    from routetune.sweep.confirm import interval

    runs = record["runs"]
    print("Search (dev, seed 0): domain dev perplexity, general dev change\n")
    print("| trial | domain dev ppl | general dev change | general test change |\n|---|---|---|---|")
    seed0 = [k for k in runs if k.endswith(f":{SEARCH_SEED}")]
    for spec in sorted(seed0, key=lambda k: (k.split(":")[0], float(k.split(":")[1]))):
        r = runs[spec]
        print(f"| {spec.rsplit(':', 1)[0]} | {r['dev'][TASK]:.2f} | {100 * r['change'][DEV]:+.2f}% | "
              f"{100 * r['change'][TEST]:+.2f}% |")
    for b in BUDGETS:
        share, lr = choose(record, "fixed", SHARES, b), choose(record, "lr", LRS, b)
        print(f"\nBudget {100 * b:+.0f}% (chosen on dev: fixed share {share}, plain lr {lr})\n")
        print("| method | seeds | domain test ppl | general test change | general dev change | within budget on "
              "test | train s/run |\n|---|---|---|---|---|---|---|")
        for kind, v in (("budget-v1", b), ("budget-start", b), *((k, b) for k in SAFE),
                        ("fixed", share), ("hf", share), ("lr", lr)):
            got = {k.split(":")[2]: runs[k] for k in runs
                   if k.split(":")[0] == kind and v is not None and float(k.split(":")[1]) == v
                   and k.split(":")[2] != str(SEARCH_SEED)}
            if not got:
                continue
            rs = list(got.values())
            ppl, chg = interval([r["test"][TASK] for r in rs]), interval([r["change"][TEST] for r in rs])
            devs = [r["change"][DEV] for r in rs if DEV in r["change"]]  # the Hugging Face runs measure no dev
            dev = f"{100 * interval(devs)['mean']:+.2f}%" if devs else "not measured"
            half = lambda i, f=1: f" ± {f * i['half']:.2f}" if i["half"] is not None else ""  # noqa: E731
            ok = sum(r["change"][TEST] <= b for r in rs)
            secs = sum(r["train_seconds"] for r in rs) / len(rs)
            print(f"| {kind} {v} | {', '.join(sorted(got, key=int))} | {ppl['mean']:.2f}{half(ppl)} | "
                  f"{100 * chg['mean']:+.2f}%{half(chg, 100)} | {dev} | {ok}/{len(rs)} | "
                  f"{secs:.0f} |")


def table_heldout(record: dict) -> None:
    """The third round: per seed and mean ± 95% t-interval of the budgeted runs and the fixed shares
    beside them, with paired differences (budgeted minus fixed) on the seeds both have."""
    from routetune.sweep.confirm import interval

    runs = record["runs"]
    print(f"Third round ({record.get('machine', '?')})\n")
    for b, share in ((0.02, 0.45), (0.05, 0.3)):
        rows = {"budget-margin": b, "fixed": share}
        got = {kind: {int(k.split(":")[2]): runs[k] for k in runs if k.split(":")[0] == kind
                      and float(k.split(":")[1]) == v and int(k.split(":")[2]) in HELDOUT_SEEDS}
               for kind, v in rows.items()}
        print(f"Budget {100 * b:+.0f}% (fixed share {share})\n")
        print("| run | " + " | ".join(f"seed {s}" for s in HELDOUT_SEEDS)
              + " | domain test ppl | test-half change | within budget on test (dev) |")
        print("|---|" + "---|" * (len(HELDOUT_SEEDS) + 3))
        for kind, v in rows.items():
            rs = got[kind]
            if not rs:
                continue
            cells = [f"{r['test'][TASK]:.2f} / {100 * r['change'][TEST]:+.2f}% / {100 * r['change'][DEV]:+.2f}%"
                     if (r := rs.get(s)) else "" for s in HELDOUT_SEEDS]
            ppl = interval([r["test"][TASK] for r in rs.values()])
            chg = interval([r["change"][TEST] for r in rs.values()])
            half = lambda i, f=1: f" ± {f * i['half']:.2f}" if i["half"] is not None else ""  # noqa: E731
            ok = sum(r["change"][TEST] <= b for r in rs.values())
            dev = sum(r["change"][DEV] <= b for r in rs.values())
            print(f"| {kind} {v} | " + " | ".join(cells) + f" | {ppl['mean']:.2f}{half(ppl)} | "
                  f"{100 * chg['mean']:+.2f}%{half(chg, 100)} | {ok} of {len(rs)} ({dev} of {len(rs)}) |")
        both = sorted(set(got["budget-margin"]) & set(got["fixed"]))
        if both:
            a, f = got["budget-margin"], got["fixed"]
            dom = interval([100 * (a[s]["test"][TASK] / f[s]["test"][TASK] - 1) for s in both])
            gen = interval([100 * (a[s]["change"][TEST] - f[s]["change"][TEST]) for s in both])
            half = lambda i: f" ± {i['half']:.2f}" if i["half"] is not None else ""  # noqa: E731
            print(f"\nPaired on seeds {both}: domain test ppl {dom['mean']:+.2f}%{half(dom)}, general test change "
                  f"{gen['mean']:+.2f}{half(gen)} points\n")
        for s_ in sorted(got["budget-margin"]):
            t = got["budget-margin"][s_].get("trace", [])
            if t:
                print(f"seed {s_} trace (step: sample change / margin / share): "
                      + ", ".join(f"{e['step']}: {100 * e['change']:+.1f}/{100 * e.get('margin', 0):.1f}/"
                                  f"{e['share']:.2f}" for e in t[1::2]))
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["plan", "search", "confirm", "table", "heldout", "run", "one"])
    ap.add_argument("spec", nargs="*", help="run: the runs, as kind:value:seed (e.g. fixed:0.3:0)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are split between them)")
    a = ap.parse_args()
    if a.phase == "one":
        import routetune  # noqa: F401  (first, as the CLI does)
        from routetune.logs import setup_logging

        setup_logging()
        print(json.dumps(run_one(a.spec[0])))
    elif a.phase == "run":
        run_all(a.spec, a.jobs)
    elif a.phase == "plan":  # the search's decisions are read again once its runs are in
        run_all(plan_specs(load())[:10], a.jobs)
        run_all(plan_specs(load()), a.jobs)
    elif a.phase == "search":
        run_all(search_specs(), a.jobs)
    elif a.phase == "confirm":
        run_all(confirm_specs(load()), a.jobs)
    elif a.phase == "heldout":
        table_heldout(load())
    else:
        table(load())


if __name__ == "__main__":
    main()
