"""`routetune sweep`: an optuna study whose trials are run folders scored on dev data; it resumes
after kill -9 losing at most the running trial, two processes share one study, the chosen
settings are confirmed on test with seeds and intervals, a mixing law is fitted and checked, and
the report draws the front."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

from support import forkserver
import pytest
import yaml

from support import cli_env, make_config, run_cli

optuna = pytest.importorskip("optuna")

from routetune.errors import ConfigError, RunError  # noqa: E402


def _sweep(tmp_path, tiny_model_dir, ner_files, **extra):
    held_dev, held_test = tmp_path / "general-dev.txt", tmp_path / "general-test.txt"
    held_dev.write_text("the river of bread and salt ran past the store in paris . " * 20)
    held_test.write_text("john opened a store in london and the apple was salt . " * 20)
    base = make_config(tmp_path, tiny_model_dir, ner_files, **{
        "train.epochs": 1, "train.eval_each_epoch": True,
        "evals": {"general-dev": {"path": str(held_dev), "split": "dev"}, "general-test": {"path": str(held_test)}}})
    sweep = {"base": base.name, "output_dir": str(tmp_path / "studies"), "name": "mix", "trials": 3,
             "sampler": "random", "seed": 5, "heartbeat": 1,
             "objectives": [{"kind": "task"}, {"kind": "retention"}],
             "space": {"routing.weights": {"type": "simplex", "keys": ["ner", "general"]},
                       "train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}},
             "baselines": {"plain": {"routing.weights.general": 0.0}}, **extra}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _trials(study_dir):
    from routetune.reports.study import load_study

    return load_study(study_dir)[1].get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    from support import write_task_and_general
    from routetune.sweep.run import optimize

    tmp = tmp_path_factory.mktemp("sweep")
    path = _sweep(tmp, tiny_model_dir, write_task_and_general(tmp), trials=4)
    st = optimize(path)
    return path, st.folder


def test_trials_are_run_folders_scored_on_dev_data_only(finished):
    from routetune.sweep.study import retention_change

    path, folder = finished
    trials = _trials(folder)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    for t in trials:
        run_dir = folder / f"trial-{t.number:04d}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert "test" not in summary  # never scored on test during the search
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["train"]["lr"] == pytest.approx(t.params["train.lr"])
        weights = t.user_attrs["setting"]
        assert cfg["routing"]["weights"]["general"] == pytest.approx(weights["routing.weights.general"])
        assert weights["routing.weights.ner"] + weights["routing.weights.general"] == pytest.approx(1, abs=1e-5)
        evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        dev = [e["metrics"]["ner/f1"] for e in evals if e["event"] == "eval" and e["step"] == summary["best"]["step"]]
        assert t.values[0] == pytest.approx(dev[-1])
        assert t.values[1] == pytest.approx(retention_change(summary, "general-dev"))
        assert set(summary["dev"]) == {"general-dev"} and "general-dev/mlm_loss" in summary["before_after"]


def test_the_report_draws_the_front_and_lists_the_trials(finished):
    _, folder = finished
    out = json.loads(run_cli("report", str(folder), "--json").stdout)
    assert out["objectives"] == ["task", "retention"] and len(out["trials"]) == 4 and out["pareto_front"]
    run_cli("report", str(folder))
    assert (folder / "report" / "study_front.png").stat().st_size > 5000
    md = (folder / "report" / "report.md").read_text()
    assert "| trial | state | task | retention | front | feasible | setting |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    feasible = {t["number"]: t["feasible"] for t in out["trials"]}
    assert len(rows) == 4 and all(line.split("|")[6].strip() == ("yes" if feasible[int(line.split("|")[1])] else "no")
                                  for line in rows)  # as --json says, never blank
    if out["importances"]:
        assert "too few for fANOVA" in md  # 4 trials: the importances carry a caveat


def test_the_front_plot_has_one_legend_entry_per_kind_of_point(tmp_path, monkeypatch):
    from routetune.reports import render
    from routetune.reports import study as report_study

    def trial(n, task, retention, feasible=True):
        return {"number": n, "state": "COMPLETE", "values": {"task": task, "retention": retention},
                "feasible": feasible}

    seen = {}

    def keep(fig, path):
        ax = fig.axes[0]
        seen["labels"] = ax.get_legend_handles_labels()[1]
        seen["colours"] = [tuple(c.get_facecolor()[0]) for c in ax.collections]
        return str(path)

    monkeypatch.setattr(render, "save", keep)
    data = {"objectives": ["task", "retention"], "directions": ["maximize", "minimize"], "pareto_front": [0, 1],
            "trials": [trial(0, 0.6, -0.1), trial(1, 0.5, -0.2), trial(2, 0.4, -0.05)]}
    report_study._plot_front(data, tmp_path)
    assert seen["labels"] == ["Pareto front", "trial"]  # no entry for infeasible points when there are none
    assert seen["colours"][0] != seen["colours"][1]
    data["trials"].append(trial(3, 0.7, 0.3, feasible=False))
    report_study._plot_front(data, tmp_path)
    assert seen["labels"] == ["Pareto front", "trial", "infeasible"]


def test_confirm_trains_fresh_seeds_and_reports_test_intervals(finished, monkeypatch):
    from scipy import stats

    from routetune.sweep import confirm as module
    from routetune.sweep.confirm import SEED_BASE, confirm

    path, folder = finished
    # another process holds one run (a second `--confirm` on the study): this one trains every
    # other run first, then waits for it (here: lets it go) and continues it
    held = folder / "confirm" / ".locks" / f"base-seed{SEED_BASE}"
    held.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
                               str(held)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    claim, waited = module._claimed_run, []

    def claimed(st, label, setting, seed, wait, place):
        if wait:  # every run it could take is done, the held one untouched
            waited.append(label)
            done = sorted(p.parent.name for p in (folder / "confirm").glob("*/summary.json"))
            assert f"base-seed{SEED_BASE}" not in done and len(done) == len(module.chosen_trials(st)) * 2 + 3
            holder.kill()
            holder.wait()
        return claim(st, label, setting, seed, wait, place)

    monkeypatch.setattr(module, "_claimed_run", claimed)
    report = confirm(path, 2)
    assert waited == ["base"]
    labels = set(report["scores"])
    assert {"base", "plain"} <= labels and any(n.startswith("trial-") for n in labels)
    plain = report["scores"]["plain"]["test ner/f1"]
    runs = [json.loads((folder / "confirm" / f"plain-seed{SEED_BASE + i}" / "summary.json").read_text())
            for i in range(2)]
    values = [r["test"]["ner"]["f1"] for r in runs]
    assert plain["values"] == values
    sd = math.sqrt(sum((v - sum(values) / 2) ** 2 for v in values))
    assert plain["half"] == pytest.approx(stats.t.ppf(0.975, 1) * sd / math.sqrt(2))
    cfgs = [yaml.safe_load((folder / "confirm" / f"plain-seed{SEED_BASE + i}" / "config.yaml").read_text())
            for i in range(2)]
    assert [c["train"]["seed"] for c in cfgs] == [SEED_BASE, SEED_BASE + 1]
    assert cfgs[0]["routing"]["weights"]["general"] == 0
    assert "general-test/mlm_loss change" in report["scores"]["base"]
    assert "general-dev/mlm_loss change" not in report["scores"]["base"]  # dev sets chose; test confirms
    assert any(k.endswith("- plain: test ner/f1") for k in report["paired"])
    assert report == confirm(path, 2)  # a second call reuses the finished runs


def test_a_resumed_study_refuses_a_changed_search_but_takes_a_new_budget_and_test_text(finished, tmp_path):
    from routetune.sweep.study import open_study

    path, folder = finished
    sweep = yaml.safe_load(path.read_text())
    sweep["base"] = str(path.parent / sweep["base"])

    def resume_with(**changes):
        changed = tmp_path / "changed.yaml"
        changed.write_text(yaml.safe_dump({**sweep, **changes}))
        return open_study(changed, resume=True)

    (tmp_path / "more.txt").write_text("a new general text, scored on test only . " * 20)
    st = resume_with(trials=9, set={"evals.more-test": {"path": str(tmp_path / "more.txt"), "split": "test"}},
                     baselines={"plain": {"routing.weights.general": 0.0}, "half": {"routing.weights.general": 0.5}})
    assert st.folder == folder and st.cfg.trials == 9
    space = {**sweep["space"], "train.lr": {"type": "float", "low": 1e-5, "high": 3e-3, "log": True}}
    with pytest.raises(ConfigError, match=r"changed.yaml: space differs from the study's .*sweep.json"):
        resume_with(space=space)
    with pytest.raises(ConfigError, match="objectives, set differ from"):
        resume_with(objectives=[{"kind": "task"}], set={"train.epochs": 2})


def test_the_mixing_law_can_hold_a_categorical_choice_fixed():
    from types import SimpleNamespace

    import numpy as np

    from routetune.sweep.law import fit_law, parse_where

    study = optuna.create_study(directions=["maximize", "minimize"])
    curves = {0.0: (0.1, -4.0), 1.0: (0.3, -1.0)}  # retention k * exp(t x) - 0.1, by distill
    for distill, (k, t) in curves.items():
        for x in (0.0, 0.15, 0.3, 0.45, 0.6):
            setting = {"routing.weights.general": x, "sources.general.distill": distill}
            study.add_trial(optuna.trial.create_trial(values=[0.5 - 0.1 * x, k * np.exp(t * x) - 0.1],
                                                      user_attrs={"setting": setting},
                                                      params={}, distributions={}))
    st = SimpleNamespace(
        study=study,
        directions=["maximize", "minimize"],
        cfg=SimpleNamespace(objectives=[SimpleNamespace(kind="task"), SimpleNamespace(kind="retention")]),
    )
    where = parse_where(["sources.general.distill=1.0"])
    assert where == {"sources.general.distill": 1.0}
    fit = fit_law(st, "routing.weights.general", 0.1, where)
    assert (fit["retention_fit"]["k"], fit["retention_fit"]["t"]) == pytest.approx((0.3, -1.0), rel=1e-3)
    assert len(fit["points"]) == 5 and fit["where"] == where
    # the budget is met where 0.3 exp(-x) - 0.1 <= 0.1, from x = ln 1.5 on; the task falls with x
    assert fit["predicted"]["x"] == pytest.approx(math.log(1.5), abs=1e-3)
    with pytest.raises(ConfigError, match="--where: sources.general.distil is not a key"):
        fit_law(st, "routing.weights.general", 0.1, {"sources.general.distil": 1.0})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_where(["distill"])
    with pytest.raises(RunError, match="among the trials with sources.general.distill=0.5"):
        fit_law(st, "routing.weights.general", 0.1, {"sources.general.distill": 0.5})


def test_confirm_points_spreads_the_chosen_settings_along_the_front():
    from types import SimpleNamespace

    from routetune.sweep.confirm import chosen_trials

    study = optuna.create_study(directions=["maximize", "minimize"])
    for i in range(7):  # a front of 6 (task up, retention change up); trial 6 is dominated by trial 2
        values = [0.5 + 0.01 * i, -0.1 + 0.02 * i] if i < 6 else [0.51, 0.2]
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs={"setting": {}}, params={},
                                                  distributions={}))

    def chosen(points):
        st = SimpleNamespace(study=study, directions=["maximize", "minimize"], folder="study",
                             cfg=SimpleNamespace(objectives=[SimpleNamespace(kind="task"),
                                                             SimpleNamespace(kind="retention")], confirm_points=points))
        return [t.number for t in chosen_trials(st)]

    assert chosen(4) == [5, 3, 2, 0]  # both ends first-and-last, evenly between, best task first
    assert chosen(2) == [5, 0]
    assert chosen(1) == [5]  # the end best on the task
    assert chosen(10) == [5, 4, 3, 2, 1, 0]  # the whole front

    # the sweep file may list retention first: the values come in that order, the task is still read
    swapped = optuna.create_study(directions=["minimize", "maximize"])
    for t in study.get_trials():
        swapped.add_trial(optuna.trial.create_trial(values=t.values[::-1], user_attrs={"setting": {}}, params={},
                                                    distributions={}))
    st = SimpleNamespace(
        study=swapped,
        directions=["minimize", "maximize"],
        folder="study",
        cfg=SimpleNamespace(
            objectives=[SimpleNamespace(kind="retention"), SimpleNamespace(kind="task")], confirm_points=1
        ),
    )
    assert [t.number for t in chosen_trials(st)] == [5]


def test_the_mixing_law_predicts_and_a_run_measures(finished):
    from routetune.sweep.law import _fit, law

    x = [0.0, 0.1, 0.2, 0.4, 0.6]
    import numpy as np

    fit = _fit(np.array(x), np.array([0.5 + 0.3 * math.exp(-4 * v) for v in x]))
    assert (fit["c"], fit["k"], fit["t"]) == pytest.approx((0.5, 0.3, -4), rel=1e-3)
    path, folder = finished
    result = law(path, "routing.weights.general", budget=10.0)
    check = folder / f"law-check-general-{result['predicted']['x']:.4f}"
    assert 0 <= result["predicted"]["x"] <= 1 and (check / "summary.json").is_file()
    assert set(result["measured"]) == {"task", "retention", "run"} and result["measured"]["run"] == str(check)
    cfg = yaml.safe_load((check / "config.yaml").read_text())
    assert cfg["routing"]["weights"]["general"] == pytest.approx(result["predicted"]["x"], abs=1e-6)
    assert cfg["routing"]["weights"]["ner"] == pytest.approx(1 - result["predicted"]["x"], abs=1e-6)
    # the law models the mixture alone: the other settings come from the best trial on the task
    best = max(_trials(folder), key=lambda t: t.values[0])
    assert result["settings_from_trial"] == best.number
    assert cfg["train"]["lr"] == pytest.approx(best.params["train.lr"])
    assert json.loads((folder / "law.json").read_text())["predicted"] == result["predicted"]
    run_cli("report", str(folder))
    md = (folder / "report" / "report.md").read_text()
    assert f"the check run's other settings from trial {best.number}" in md and "| measured |" in md


def test_kill_9_loses_at_most_the_running_trial(tmp_path, tiny_model_dir, ner_files):
    path = _sweep(tmp_path, tiny_model_dir, ner_files, trials=2, **{"set": {"train.save_every_steps": 2}})
    killed = run_cli("sweep", str(path), fault="after_step:3", check=False)  # SIGKILL inside trial 0
    assert killed.returncode != 0
    folder = tmp_path / "studies" / "mix"
    assert [t.state.name for t in _trials(folder)] == ["RUNNING"]
    again = run_cli("sweep", str(path), "--resume")
    assert "trial" in again.stdout
    trials = _trials(folder)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1
    failed = next(t for t in trials if t.state.name == "FAIL")
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == failed.number)
    assert retry.params == failed.params  # the killed trial's setting, tried again
    # it continued the killed trial's run folder from its checkpoint instead of starting over
    assert retry.user_attrs["run0"]["run"].endswith(f"trial-{failed.number:04d}")
    assert "resumed from step-" in (folder / f"trial-{failed.number:04d}" / "train.log").read_text()


def test_two_processes_share_one_study(tmp_path, tiny_model_dir, ner_files):
    path = _sweep(tmp_path, tiny_model_dir, ner_files, trials=4)
    env = cli_env()
    first = forkserver.popen("routetune.cli", ["sweep", str(path)], env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    folder = tmp_path / "studies" / "mix"
    for _ in range(600):  # the second worker joins once the first has created the study
        if (folder / "study.db").is_file():
            break
        time.sleep(0.1)
    second = forkserver.run("routetune.cli", ["sweep", str(path), "--resume"], env, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err + second.stderr
    trials = _trials(folder)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # four in all, not four each
    assert sorted(p.name for p in folder.glob("trial-*")) == [f"trial-{i:04d}" for i in range(4)]


def test_sweep_file_mistakes_are_one_line(tmp_path, tiny_model_dir, ner_files):
    from routetune.sweep.study import open_study

    path = _sweep(tmp_path, tiny_model_dir, ner_files)
    bad = yaml.safe_load(path.read_text())
    bad["space"]["train.lrr"] = {"type": "float", "low": 1e-4, "high": 1e-3}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"mix.yaml: space.train.lrr: .*train.lrr"):
        open_study(path, resume=False)
    bad["space"].pop("train.lrr")
    bad["space"]["train.lr"] = {"type": "float", "low": 1e-3, "high": 1e-4}
    path.write_text(yaml.safe_dump(bad))
    proc = run_cli("sweep", str(path), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert (
        proc.stderr.startswith(f"error: {path}:") and "space.train.lr.high: expected a value above low" in proc.stderr
    )
    bad["space"]["train.lr"] = {"type": "float", "low": 1e-4, "high": 1e-3}
    bad["pruner"] = "median"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="pruning needs a single objective"):
        open_study(path, resume=False)
    bad["pruner"] = "none"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(RunError, match="no study to resume"):
        open_study(path, resume=True)
    open_study(path, resume=False)
    with pytest.raises(RunError, match="the study exists; --resume continues it"):
        open_study(path, resume=False)
    mine = tmp_path / "studies" / "other"
    mine.mkdir()
    bad["name"] = "other"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(RunError, match="exists and is not a routetune study"):
        open_study(path, resume=False)


def test_a_study_without_dev_evaluations_fails_before_any_trial_trains(tmp_path, tiny_model_dir, ner_files):
    from routetune.sweep.study import open_study

    path = _sweep(tmp_path, tiny_model_dir, ner_files, set={"train.eval_each_epoch": False})
    with pytest.raises(ConfigError, match=r"mix.yaml: objectives: 'ner/f1' .* never evaluate: set "
                                          r"train.eval_each_epoch or train.eval_every_steps"):
        open_study(path, resume=False)
    path = _sweep(tmp_path, tiny_model_dir, ner_files, set={"sources.ner.dev": None})
    with pytest.raises(ConfigError, match=r"source 'ner' has none: give it dev, holdout.dev or dataset.dev"):
        open_study(path, resume=False)
    path = _sweep(tmp_path, tiny_model_dir, ner_files, objectives=[{"kind": "task", "metric": "nerr/f1"}])
    with pytest.raises(ConfigError, match=r"'nerr/f1' names no source of .*\(sources: general, ner\)"):
        open_study(path, resume=False)
    assert not (tmp_path / "studies").exists()  # nothing was written
    path = _sweep(tmp_path, tiny_model_dir, ner_files, set={"train.eval_each_epoch": False,
                                                            "train.eval_every_steps": 2})
    assert open_study(path, resume=False).directions == ["maximize", "minimize"]


def test_the_space_samples_conditions_and_simplexes(tmp_path):
    from routetune.sweep.config import Param
    from routetune.sweep.space import suggest

    space = {"peft.r": Param(type="int", low=2, high=16, when={"peft.method": "lora"}),
             "peft.method": Param(type="categorical", choices=["none", "lora"]),
             "routing.weights": Param(type="simplex", keys=["a", "b", "c"])}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = suggest(trial, space)
        seen.add(values["peft.method"])
        assert ("peft.r" in values) == (values["peft.method"] == "lora")
        assert sum(values[f"routing.weights.{k}"] for k in "abc") == pytest.approx(1, abs=1e-5)
        study.tell(trial, 0.0)
    assert seen == {"none", "lora"}


def test_pruning_reports_dev_scores_and_stops_a_trial():
    from types import SimpleNamespace

    from routetune.sweep.run import _pruning_listener

    reported = []
    trial = SimpleNamespace(report=lambda v, s: reported.append((s, v)), should_prune=lambda: len(reported) > 1)
    st = SimpleNamespace(cfg=SimpleNamespace(objectives=[SimpleNamespace(kind="task", metric="ner/f1")]))
    listen = _pruning_listener(st, trial)
    listen({"event": "train", "step": 1})
    listen({"event": "eval", "step": 4, "metrics": {"ner/f1": 0.2}})
    with pytest.raises(optuna.TrialPruned):
        listen({"event": "eval", "step": 8, "metrics": {"ner/f1": 0.1}})
    assert reported == [(4, 0.2), (8, 0.1)]


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_the_study_and_resume_continues_the_stopped_trial(tmp_path, tiny_model_dir,
                                                                                  ner_files, stop):
    import signal

    path = _sweep(tmp_path, tiny_model_dir, ner_files, trials=2, **{"set": {"train.save_every_steps": 1}})
    env = cli_env()
    # a terminal's Ctrl-C: the child starts with SIGINT at its default disposition (forkserver.py),
    # even when this suite was started in the background with SIGINT ignored
    proc = forkserver.popen("routetune.cli", ["sweep", str(path)], env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "studies" / "mix"
    for _ in range(1200):  # interrupt once the first trial has a checkpoint
        if list((folder / "trial-0000" / "checkpoints").glob("step-*")):
            break
        time.sleep(0.05)
    proc.send_signal(getattr(signal, stop))
    _, err = proc.communicate(timeout=120)
    code, word = {"SIGINT": (130, "aborted"), "SIGTERM": (143, "terminated")}[stop]
    assert proc.returncode == code and err.strip().endswith(word), err
    assert [t.state.name for t in _trials(folder)] == ["FAIL"]
    run_cli("sweep", str(path), "--resume")
    trials = _trials(folder)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == 0
    assert trials[1].user_attrs["run0"]["run"].endswith("trial-0000")  # the stopped run, continued


def test_a_retention_budget_marks_trials_infeasible_and_the_best_feasible_one_is_chosen(tmp_path, tiny_model_dir):
    from support import write_task_and_general
    from routetune.sweep.confirm import chosen_trials
    from routetune.sweep.run import optimize
    from routetune.sweep.study import retention_change

    path = _sweep(tmp_path, tiny_model_dir, write_task_and_general(tmp_path), trials=3, objectives=[{"kind": "task"}],
                  max_retention=-0.01)  # today: one of the three trials is infeasible, two are not
    st = optimize(path)
    trials = _trials(st.folder)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:  # retention is not an objective here, but the constraint measures it on the dev set
        summary = json.loads((st.folder / f"trial-{t.number:04d}" / "summary.json").read_text())
        change = retention_change(summary, "general-dev")
        assert len(t.values) == 1 and t.user_attrs["retention"] == pytest.approx(change)
        assert t.user_attrs["constraint"] == pytest.approx([change + 0.01])
    feasible = [t for t in trials if t.user_attrs["retention"] <= -0.01]
    if feasible:
        assert [t.number for t in chosen_trials(st)] == [max(feasible, key=lambda t: t.values[0]).number]
    else:
        with pytest.raises(RunError, match="no finished trial meets the constraints"):
            chosen_trials(st)


def test_trials_and_set_on_the_command_line(tmp_path, tiny_model_dir, ner_files):
    """`--trials N` and `--set KEY=VALUE`: a short study without editing the sweep file; the values
    are recorded with the study, a resume with other ones is refused, a bad key is one line."""
    path = _sweep(tmp_path, tiny_model_dir, ner_files, trials=20)
    bad = run_cli("sweep", str(path), "--set", "train.max_stepz=3", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --set train.max_stepz=3: train.max_stepz: unknown key under train"
    ), bad.stderr
    run_cli("sweep", str(path), "--trials", "2", "--set", "train.max_steps=3")
    folder = tmp_path / "studies" / "mix"
    trials = _trials(folder)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    for t in sorted(folder.glob("trial-*")):
        assert json.loads((t / "summary.json").read_text())["steps"] == 3
    recorded = json.loads((folder / "sweep.json").read_text())["config"]
    assert recorded["trials"] == 2 and recorded["set"]["train.max_steps"] == 3
    other = run_cli("sweep", str(path), "--resume", "--trials", "3", "--set", "train.max_steps=4", check=False)
    assert other.returncode == 2 and "set differs" in other.stderr
    both = run_cli("sweep", str(path), "--confirm", "2", "--trials", "3", check=False)
    assert both.returncode == 2 and "--confirm and --law read the study" in both.stderr
