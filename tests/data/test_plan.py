"""Routing configuration -> router and run length (plan_run), and routed end-to-end runs."""

import json

import numpy as np
import pytest

from support import make_config
from routetune.config import parse_config
from routetune.data.plan import plan_run
from routetune.errors import ConfigError
from routetune.workflow import train


def cfg(routing=None, train_cfg=None):
    raw = {
        "model": {"name": "x"},
        "sources": {
            "task": {"objective": "token-classification", "train": "t.conll"},
            "aux": {"objective": "token-classification", "train": "a.conll"},
            "general": {"objective": "masked-lm", "train": "g.txt"},
        },
        "routing": routing or {},
        "train": {"precision": "fp32", "device": "cpu", "batch_size": 10, "epochs": 2, **(train_cfg or {})},
    }
    return parse_config(raw)


SIZES = {"task": 100, "aux": 400, "general": None}


def test_default_is_equal_weights_and_exact_primary_epochs():
    router, steps, start = plan_run(cfg(), SIZES)
    assert np.allclose(start, [1 / 3] * 3)
    picks = [router.choose(s, 1)[0] for s in range(steps)]
    assert picks.count(0) == 20 and picks[-1] == 0  # 2 epochs x 10 batches of the primary, exactly


def test_temperature_follows_sizes():
    c = cfg({"temperature": 1.0, "weights": None})
    with pytest.raises(ConfigError, match="routing.temperature: source 'general' is a text stream"):
        plan_run(c, SIZES)
    _, _, start = plan_run(c, {"task": 100, "aux": 400, "general": 500})
    assert np.allclose(start, [0.1, 0.4, 0.5])
    _, _, flat = plan_run(cfg({"temperature": 1e6}), {"task": 100, "aux": 400, "general": 500})
    assert np.allclose(flat, [1 / 3] * 3, atol=1e-4)


def test_counts_define_mixture_epochs():
    c = cfg({"counts": {"task": {"repeat": 2}, "aux": {"choose": 100}, "general": {"choose": 100}},
             "strategy": "interleaved", "granularity": "example"})
    router, steps, start = plan_run(c, SIZES)
    assert np.allclose(start, [0.5, 0.25, 0.25])
    assert steps == 2 * 400 // 10  # 2 mixture epochs of 400 examples, batches of 10
    picks = [i for s in range(steps) for i in router.choose(s, 10)]
    assert [picks.count(i) for i in range(3)] == [400, 200, 200]  # exact per-epoch counts
    with pytest.raises(ConfigError, match="routing.counts.general.repeat: source 'general' is a text stream"):
        plan_run(cfg({"counts": {"task": {"repeat": 1}, "aux": {"repeat": 1}, "general": {"repeat": 1}}}), SIZES)


@pytest.mark.parametrize(
    "routing, message",
    [
        (
            {"weights": {"task": 1, "aux": 1, "general": 1}, "temperature": 2.0},
            "exactly one of weights, temperature or counts",
        ),
        ({"weights": {"task": 1, "aux": 1}}, "routing.weights: missing source 'general'"),
        (
            {"counts": {"task": {"repeat": 1, "choose": 3}, "aux": {"choose": 1}, "general": {"choose": 1}}},
            "routing.counts.task: give exactly one of repeat or choose",
        ),
        ({"schedule": {"kind": "linear"}}, "routing.schedule.end: required"),
        (
            {
                "schedule": {
                    "kind": "stages",
                    "stages": [{"until": 0.5, "weights": {"task": 1, "aux": 0, "general": 1}}],
                }
            },
            "last stage must end at until: 1.0",
        ),
        (
            {"strategy": "adaptive", "schedule": {"kind": "linear", "end": {"task": 1, "aux": 1, "general": 0}}},
            "adaptive strategy sets its own weights",
        ),
        ({"loss_weights": {"nope": 1}}, "routing.loss_weights.nope: no source named"),
    ],
)
def test_conflicts_refused(routing, message):
    with pytest.raises(ConfigError, match=message):
        cfg(routing)


def test_schedule_sets_steps_from_expected_primary_share():
    c = cfg({"weights": {"task": 0.5, "aux": 0, "general": 0.5},
             "schedule": {"kind": "linear", "end": {"task": 1.0, "aux": 0, "general": 0.0}}})
    router, steps, _ = plan_run(c, SIZES)
    assert steps == int(np.ceil(20 / 0.75))  # mean primary share of a linear 0.5 -> 1.0 schedule
    assert router.horizon == steps
    assert np.allclose(router.target(0), [0.5, 0, 0.5]) and np.allclose(router.target(steps), [1, 0, 0])


def test_max_steps_caps_and_stop_first():
    _, steps, _ = plan_run(cfg(train_cfg={"max_steps": 7}), SIZES)
    assert steps == 7
    _, steps, _ = plan_run(cfg({"on_exhausted": "stop_first"}), SIZES)
    router, full, _ = plan_run(cfg(), SIZES)
    assert steps < full  # the primary (100 examples) ends its first pass before its second


@pytest.mark.parametrize("routing", [
    {"strategy": "interleaved", "granularity": "example", "loss_weights": {"general": 0.5}},
    {"strategy": "adaptive", "adaptive": {"update_every": 2}},
    {"strategy": "iid", "schedule": {"kind": "cosine", "end": {"ner": 0.9, "general": 0.1}}},
])
def test_routed_end_to_end(tmp_path, tiny_model_dir, ner_files, routing):
    routing = {"weights": {"ner": 0.6, "general": 0.4}, "seed": 3, **routing}
    path = make_config(tmp_path, tiny_model_dir, ner_files, routing=routing)
    run_dir, summary = train(path)
    assert summary["steps"] == summary["planned_steps"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in events if e["event"] == "train"][-1]
    assert set(last["sources"]) == {"ner", "general"}
    shares = {n: v["share"] for n, v in last["sources"].items()}
    assert abs(sum(shares.values()) - 1) < 1e-9 and all(0 < v < 1 for v in shares.values())
    if routing["strategy"] == "adaptive":
        updates = [e for e in events if e["event"] == "route_update"]
        assert len(updates) == summary["steps"] // 2 and set(updates[0]["weights"]) == {"ner", "general"}
    if routing.get("granularity") == "example":
        assert summary["sources"]["ner"]["examples"] + summary["sources"]["general"]["examples"] == \
            summary["steps"] * 4
