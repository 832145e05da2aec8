"""In-memory sources on their own: the cursor's passes, the seeded per-epoch order (each example
once per pass, the same for the same seed, another next epoch), length grouping keeping that, a
position saved and restored, and a draw's shard per rank."""

from __future__ import annotations

import pytest

from routetune.data.sources import Draw, Encoded, EpochCursor, MemorySource
from routetune.errors import DataError


def _source(n: int = 10, seed: int = 3) -> MemorySource:
    return MemorySource("s", [Encoded(list(range(1, 2 + i % 4)), 0) for i in range(n)], pad_id=0, seed=seed)


def test_a_pass_ends_with_a_partial_batch_unless_it_wraps():
    cursor = EpochCursor(5)
    assert cursor.advance(3, wrap=False) == ([(0, 0), (0, 1), (0, 2)], False)
    assert cursor.advance(3, wrap=False) == ([(0, 3), (0, 4)], True)
    assert cursor.advance(7, wrap=True) == ([(1, i) for i in range(5)] + [(2, 0), (2, 1)], True)


def test_every_example_once_per_pass_in_a_seeded_order():
    a, b = _source(), _source()
    first = [i for _ in range(4) for i in a.draw(3).ids]
    assert sorted(first) == list(range(10))  # 3 + 3 + 3 + 1: the last batch of the pass is partial
    assert first == [i for _ in range(4) for i in b.draw(3).ids]  # same seed, same order
    assert [i for _ in range(4) for i in a.draw(3).ids] != first  # another order next epoch
    assert [i for _ in range(4) for i in _source(seed=4).draw(3).ids] != first


def test_length_grouping_keeps_each_example_once_per_pass():
    src = _source(40)
    src.group_by_length(4)
    ids = [i for _ in range(10) for i in src.draw(4).ids]
    assert sorted(ids) == list(range(40))
    assert any(len({len(src.encoded[i].input_ids) for i in ids[k:k + 4]}) == 1 for k in range(0, 40, 4))


def test_a_restored_position_continues_the_same_order():
    src = _source()
    src.draw(4)
    saved = src.state_dict()
    after = [src.draw(4).ids for _ in range(3)]
    again = _source()
    again.load_state_dict(saved)
    assert [again.draw(4).ids for _ in range(3)] == after


def test_a_draw_is_shared_out_between_ranks():
    draw = Draw("s", [5, 6, 7, 8, 9], None, True)
    shards = [draw.shard(r, 2) for r in range(2)]
    assert [s.ids for s in shards] == [[5, 7, 9], [6, 8]] and all(s.epoch_ended for s in shards)


def test_collate_pads_and_counts_real_tokens():
    src = _source(3)
    tensors, n_tokens = src.collate(Draw("s", [0, 1, 2]), step=0)
    assert tensors["input_ids"].shape == (3, 3) and n_tokens == 1 + 2 + 3
    assert tensors["labels"].tolist() == [0, 0, 0]


def test_an_empty_source_is_refused_naming_it():
    with pytest.raises(DataError, match="source 's' has no examples"):
        MemorySource("s", [], 0, 0)
