"""The run report and `routetune compare` (reports/run.py): every number checked against a direct
computation on a tiny model."""

import json
import re
from html.parser import HTMLParser

from typer.testing import CliRunner

from support import make_config
from routetune.cli import app

runner = CliRunner()


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append(v)


def test_report_numbers_match_direct_computation(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import evaluate_run, train

    cfg = make_config(tmp_path, tiny_model_dir, ner_files)
    run_dir, summary = train(cfg)
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    out = run_dir / "report"
    md = (out / "report.md").read_text()
    # test metrics: the same as evaluating the best checkpoint again
    direct = evaluate_run(run_dir)["ner"]
    for metric in ("f1", "precision", "recall"):
        assert re.search(rf"\| ner \| {metric} \| {direct[metric]:.4f} \|", md), metric
    # realised shares and batch counts: the same as counting plan.jsonl
    plan = [json.loads(line) for line in (run_dir / "plan.jsonl").read_text().splitlines()]
    examples = {}
    for row in plan:
        examples[row["source"]] = examples.get(row["source"], 0) + len(row["ids"])
    total = sum(examples.values())
    for source, n in examples.items():
        batches = sum(1 for row in plan if row["source"] == source)
        assert re.search(rf"\| {run_dir.name} \| {source} \| {batches} \| {n} \| \d+ \| {n / total:.4f} \|", md), source
    # best dev value: the maximum of the dev evaluations in metrics.jsonl
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max(e["metrics"]["ner/f1"] for e in evals if e["event"] == "eval")
    assert f"| {best:.4f} |" in md
    # the HTML references only files that exist, and every PNG is referenced
    parser = _Refs()
    parser.feed((out / "report.html").read_text())
    assert parser.refs
    assert all((out / ref).is_file() for ref in parser.refs)
    assert {p.name for p in out.glob("*.png")} == set(parser.refs)
    assert {"loss.png", "shares.png", "dev.png", "per_type_ner.png"} <= set(parser.refs)


def test_compare_and_report_of_several_runs(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import train

    a, sa = train(make_config(tmp_path / "a", tiny_model_dir, ner_files, **{"run.name": "on"}))
    b, sb = train(make_config(tmp_path / "b", tiny_model_dir, ner_files,
                              **{"run.name": "off", "routing.weights": {"ner": 1.0, "general": 0.0}}))
    result = runner.invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("| ner | f1 |"))
    fa, fb = sa["test"]["ner"]["f1"], sb["test"]["ner"]["f1"]
    assert line == f"| ner | f1 | {fa:.4f} | {fb:.4f} | {fb - fa:+.4f} |"
    result = runner.invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    parser = _Refs()
    parser.feed((tmp_path / "cmp" / "report.html").read_text())
    assert all((tmp_path / "cmp" / ref).is_file() for ref in parser.refs)
    result = runner.invoke(app, ["report", str(a), str(b)])  # without --out: a comparison folder beside them
    assert result.exit_code == 0, result.output
    assert (a.parent / "compare-on-off" / "report.html").is_file()


def test_compare_names_runs_apart_lists_metrics_not_counts_and_differences(tmp_path, tiny_model_dir, ner_files):
    import shutil

    from routetune.reports.run import compare_table
    from routetune.workflow import train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}))
    other = tmp_path / "elsewhere" / run_dir.name  # another run with the same folder name
    shutil.copytree(run_dir, other)
    table = compare_table([run_dir, other])
    assert f"runs/{run_dir.name}" in table and f"elsewhere/{run_dir.name}" in table
    for count in ("support", "words", "sentences", "truncated_words"):  # counts are not metrics: no +0 rows
        assert f"| {count} |" not in table
    header = next(line for line in table.splitlines() if line.startswith("| source | metric"))
    assert header.rstrip(" |").endswith(f"elsewhere/{run_dir.name} - runs/{run_dir.name}")
    f1 = next(line for line in table.splitlines() if "| f1 |" in line)
    assert f1.rstrip(" |").endswith("+0.0000")


