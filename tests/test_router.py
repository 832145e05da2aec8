import pytest

from routetune.data.readers import Sentence
from routetune.data.router import RoutedBatches, StaticRouter, count_steps
from routetune.data.sources import LabelledSource, TextStream


def test_same_seed_same_plan_other_seed_other_plan():
    w = {"a": 0.7, "b": 0.3}
    assert StaticRouter(w, 1).plan(0, 500) == StaticRouter(w, 1).plan(0, 500)
    assert StaticRouter(w, 1).plan(0, 500) != StaticRouter(w, 2).plan(0, 500)


def test_plan_is_pure_function_of_step():
    r = StaticRouter({"a": 0.5, "b": 0.5}, 7)
    full = r.plan(0, 300)
    assert r.plan(100, 300) == full[100:]
    assert [r.choose(s) for s in reversed(range(300))] == full[::-1]


def test_zero_weight_never_drawn_and_shares_close():
    r = StaticRouter({"a": 0.6, "zero": 0.0, "b": 0.4}, 3)
    plan = r.plan(0, 20000)
    assert "zero" not in plan
    share = plan.count("a") / len(plan)
    assert abs(share - 0.6) < 4 * (0.6 * 0.4 / len(plan)) ** 0.5


def test_count_steps():
    r = StaticRouter({"a": 0.5, "b": 0.5}, 0)
    steps = count_steps(r, "a", 10, None)
    assert r.plan(0, steps).count("a") == 10 and r.choose(steps - 1) == "a"
    assert count_steps(r, "a", 10, 5) == 5
    assert count_steps(StaticRouter({"a": 1.0}, 0), "a", 7, None) == 7


def _labelled(tokenizer, n=10):
    sents = [Sentence(["the", "store"] * (i % 3 + 1), ["O", "O"] * (i % 3 + 1), i) for i in range(n)]
    return LabelledSource("ner", sents, ["O"], tokenizer, 32, seed=5)


def test_labelled_source_epochs_cover_every_example_once(tiny_tokenizer):
    src = _labelled(tiny_tokenizer)
    seen, ended = [], []
    for _ in range(3):  # 4 + 4 + 2
        b = src.take(4, 0)
        seen += b.example_ids
        ended.append(b.epoch_ended)
    assert sorted(seen) == list(range(10)) and ended == [False, False, True]
    nxt = src.take(4, 0).example_ids
    assert nxt != seen[:4]  # reshuffled for epoch 1


def test_state_dict_round_trip_continues_identically(tiny_tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the river runs slowly through the old town\n" * 200)

    def make():
        sources = {"ner": _labelled(tiny_tokenizer),
                   "general": TextStream("general", str(text), tiny_tokenizer, 16, seed=9, shuffle_buffer=8)}
        return RoutedBatches(StaticRouter({"ner": 0.6, "general": 0.4}, 11), sources, 3)

    ref = make()
    trace = [(b.source, b.example_ids, b.tensors["input_ids"].tolist()) for b in (ref.next() for _ in range(40))]
    for cut in (0, 7, 23):
        first = make()
        for _ in range(cut):
            first.next()
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        rest = [(b.source, b.example_ids, b.tensors["input_ids"].tolist()) for b in (resumed.next() for _ in range(40 - cut))]
        assert rest == trace[cut:]


def test_router_state_mismatch_refused(tiny_tokenizer):
    a = RoutedBatches(StaticRouter({"ner": 1.0}, 1), {"ner": _labelled(tiny_tokenizer)}, 2)
    b = RoutedBatches(StaticRouter({"ner": 1.0}, 2), {"ner": _labelled(tiny_tokenizer)}, 2)
    with pytest.raises(ValueError, match="other weights or seed"):
        b.load_state_dict(a.state_dict())


def test_text_stream_blocks_and_epochs(tiny_tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abc def ghi\n" * 50)
    s = TextStream("g", str(text), tiny_tokenizer, 16, seed=1, shuffle_buffer=4)
    b = s.take(5, 0)
    ids = b.tensors["input_ids"]
    assert ids.shape == (5, 16)  # blocks are full; no padding to anything but the batch
    cls, sep = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    assert (b.tensors["labels"][:, 0] == -100).all() and (b.tensors["labels"][:, -1] == -100).all()
    n = 0
    while not s.take(1, 0).epoch_ended:
        n += 1
    assert s.epoch == 1 and n > 5 and cls not in ids[:, 1:-1].tolist()[0] and sep != cls
