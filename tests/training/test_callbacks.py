import pytest

from routetune.errors import ConfigError
from routetune.training.callbacks import EarlyStopping


def run(stopper, values):
    out = []
    for step, v in enumerate(values, start=1):
        best, stop = stopper.update({"dev/f1": v}, step)
        out.append((best, stop))
        if stop:
            break
    return out


def test_stops_after_patience_without_improvement():
    s = EarlyStopping("dev/f1", "max", patience=2)
    out = run(s, [0.1, 0.3, 0.29, 0.3, 0.5])
    assert out == [(True, False), (True, False), (False, False), (False, True)]
    assert s.best == 0.3 and s.best_step == 2 and s.stopped_at == 4


def test_min_delta_and_min_mode():
    s = EarlyStopping("dev/f1", "min", patience=3, min_delta=0.05)
    out = run(s, [1.0, 0.97, 0.9, 0.88, 0.86, 0.851])
    # 0.97 is not 0.05 better than 1.0; 0.9 is; then three non-improvements stop it
    assert out == [(True, False), (False, False), (True, False), (False, False), (False, False), (False, True)]
    assert s.best == 0.9


def test_no_patience_never_stops():
    s = EarlyStopping("dev/f1", "max", patience=None)
    assert all(not stop for _, stop in run(s, [0.5] + [0.1] * 20))


def test_state_dict_resumes_patience():
    a = EarlyStopping("dev/f1", "max", patience=3)
    run(a, [0.5, 0.4, 0.4])
    b = EarlyStopping("dev/f1", "max", patience=3)
    b.load_state_dict(a.state_dict())
    assert b.update({"dev/f1": 0.4}, 4) == (False, True)


def test_unknown_metric():
    with pytest.raises(ConfigError, match="not among the dev metrics"):
        EarlyStopping("x/f1").update({"dev/f1": 1.0}, 1)
