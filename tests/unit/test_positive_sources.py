import io
import logging

import numpy as np
import pytest
import torch

from drifting_lightning.sampling.positives import ClassAwareSampler, ClassQueue, PositiveSource

# 12 classes: class 11 has 3 items (fewer than Npos = 5), the others 20.
LABELS = np.repeat(np.arange(12), [20] * 11 + [3])


def make(kind: str, **kw) -> PositiveSource:
    args = {"classes_per_step": 4, "positives_per_class": 5, "unconditional_per_class": 3, "seed": 7, **kw}
    if kind == "queue":
        return ClassQueue(queue_size=8, unconditional_queue_size=16, push_per_step=6, **args)
    return ClassAwareSampler(**args)


def ready(kind: str, labels=LABELS, **kw) -> PositiveSource:
    source = make(kind, **kw)
    source.setup(labels)
    return source


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


KINDS = ["sampler", "queue"]


@pytest.mark.parametrize("kind", KINDS)
def test_group_composition(kind):
    source = ready(kind)
    for _ in range(20):
        labels, pos, unc = source.draw()
        assert labels.shape == (4,) and pos.shape == (4, 5) and unc.shape == (4, 3)
        assert labels.dtype == pos.dtype == unc.dtype == torch.long
        assert len(set(labels.tolist())) == 4
        assert (torch.from_numpy(LABELS)[pos] == labels[:, None]).all()
        for g, c in enumerate(labels.tolist()):
            if c != 11:  # enough items (in the class and in its queue): distinct positives
                assert len(set(pos[g].tolist())) == 5
            assert len(set(unc[g].tolist())) == 3
        assert ((unc >= 0) & (unc < len(LABELS))).all()


@pytest.mark.parametrize("kind", KINDS)
def test_no_unconditional(kind):
    labels, pos, unc = ready(kind, unconditional_per_class=0).draw()
    assert unc.shape == (4, 0) and unc.dtype == torch.long


@pytest.mark.parametrize("kind", KINDS)
def test_small_classes_reported_once_and_drawn_with_replacement(kind, caplog):
    source = make(kind, classes_per_step=12)
    with caplog.at_level(logging.WARNING, logger="drifting_lightning.sampling.positives"):
        source.setup(LABELS)
        source.setup(LABELS)  # set up again (e.g. another stage): no second report
    reports = [r for r in caplog.records if "with replacement" in r.getMessage()]
    assert len(reports) == 1 and "11: 3 items" in reports[0].getMessage()
    assert source.small_classes == [11]
    labels, pos, _ = source.draw()
    row = pos[labels.tolist().index(11)].tolist()
    assert len(row) == 5 and set(row) == set(np.flatnonzero(LABELS == 11).tolist())  # every item, then repeats


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_get_disjoint_labels(kind):
    ranks = [make(kind) for _ in range(2)]
    for r, source in enumerate(ranks):
        source.setup(LABELS, rank=r, world_size=2)
    for _ in range(10):
        a, b = ranks[0].draw(), ranks[1].draw()
        assert not set(a.labels.tolist()) & set(b.labels.tolist())  # 4 * 2 <= 12 classes
        for d in (a, b):
            assert (torch.from_numpy(LABELS)[d.pos_idx] == d.labels[:, None]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_more_groups_than_classes_per_rank(kind):
    ranks = [make(kind, classes_per_step=8) for _ in range(2)]  # 8 * 2 > 12: labels may repeat across ranks
    for r, source in enumerate(ranks):
        source.setup(LABELS, rank=r, world_size=2)
    a, b = ranks[0].draw(), ranks[1].draw()
    assert len(set(a.labels.tolist())) == 8 and len(set(b.labels.tolist())) == 8
    labels = ready(kind, classes_per_step=30).draw().labels  # more groups than classes: every class, balanced
    assert set(torch.bincount(labels, minlength=12).tolist()) == {2, 3}


@pytest.mark.parametrize("kind", KINDS)
def test_reproducible_from_seed(kind):
    a, b, c = ready(kind), ready(kind), ready(kind, seed=8)
    draws_a, draws_b, draws_c = ([s.draw() for _ in range(5)] for s in (a, b, c))
    assert all(same(x, y) for x, y in zip(draws_a, draws_b))
    assert not all(same(x, y) for x, y in zip(draws_a, draws_c))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    source = ready(kind)
    for _ in range(7):
        source.draw()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)  # as in a checkpoint; loadable with weights_only=True
    expected = [source.draw() for _ in range(6)]
    resumed = ready(kind)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step == 7
    assert all(same(x, y) for x, y in zip(expected, [resumed.draw() for _ in range(6)]))


@pytest.mark.parametrize("kind", KINDS)
def test_skip_matches_draws(kind):
    drawn, skipped = ready(kind), ready(kind)
    for _ in range(9):
        drawn.draw()
    skipped.skip(9)
    assert skipped.step == 9 and same(drawn.draw(), skipped.draw())


def test_wrong_state_kind_is_an_error():
    with pytest.raises(ValueError, match="ClassQueue state into ClassAwareSampler"):
        ready("sampler").load_state_dict(ready("queue").state_dict())
    bigger = ClassQueue(4, 5, 3, queue_size=9, unconditional_queue_size=16, seed=7)
    bigger.setup(LABELS)
    with pytest.raises(ValueError, match="queue_size"):
        ready("queue").load_state_dict(bigger.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_empty_class_is_an_error_naming_it(kind):
    labels = np.array([0, 0, 2, 2, 2])
    with pytest.raises(ValueError, match=r"class 1 \('cat'\) has no items"):
        make(kind).setup(labels, num_classes=3, class_names=["ant", "cat", "dog"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="positives_per_class"):
        ClassAwareSampler(positives_per_class=0)
    with pytest.raises(ValueError, match="push_per_step"):
        ClassQueue(push_per_step=0)
    with pytest.raises(RuntimeError, match="setup"):
        ClassAwareSampler().draw()


def test_queues_filled_at_setup():
    source = ready("queue")
    for c in range(12):
        held = source.queue(c)
        assert len(held) == min(8, int(np.bincount(LABELS)[c])) and len(set(held.tolist())) == len(held)
        assert (LABELS[held] == c).all()
    assert source.unc_len == 16 and len(set(source.unc_queue.tolist())) == 16


def test_queue_push_order_and_eviction():
    source = ready("queue")
    members = np.flatnonzero(LABELS == 3)
    source.push(members[:5])  # queue of 3 was full (8): the 5 oldest leave, the new ones come last in order
    before = source.queue(3)
    assert before[-5:].tolist() == members[:5].tolist()
    source.push(members[5:15])  # 10 items into a queue of 8: the last 8 pushed remain, oldest first
    assert source.queue(3).tolist() == members[7:15].tolist()
    assert int(source.queue_len[3]) == 8
    items = np.arange(40)  # more than the unconditional capacity (16): it holds the last 16, in push order
    source.push(items)
    assert sorted(source.unc_queue.tolist()) == list(range(24, 40))
    assert np.roll(source.unc_queue, -source.unc_pos).tolist() == list(range(24, 40))


def test_queue_partially_filled_push_order():
    source = ClassQueue(1, 2, 0, queue_size=8, unconditional_queue_size=4, push_per_step=1)
    source.setup(np.array([0, 0, 0, 1, 1]))  # class 0 holds 3 of 8, class 1 holds 2
    assert int(source.queue_len[0]) == 3
    source.push(np.array([0, 4, 1]))
    assert source.queue(0)[-2:].tolist() == [0, 1] and int(source.queue_len[0]) == 5
    assert source.queue(1)[-1] == 4 and int(source.queue_len[1]) == 3


def test_fresh_items_are_shuffled_passes():
    source = ready("queue")
    n = len(LABELS)
    first = source.fresh_items(n)
    assert sorted(first.tolist()) == list(range(n))  # one pass covers every item once
    second = source.fresh_items(n)
    assert sorted(second.tolist()) == list(range(n)) and not np.array_equal(first, second)


def test_queue_draw_pushes_then_samples_without_replacement_from_the_queue():
    source = ready("queue")
    probe = ready("queue")
    fresh = probe.fresh_items(6)
    labels, pos, unc = source.draw()
    assert source.pushed == 6
    for i in fresh.tolist():  # the step's fresh items were pushed into their class queue and the global queue
        assert i in source.queue(int(LABELS[i])).tolist() and i in source.unc_queue.tolist()
    for g, c in enumerate(labels.tolist()):
        held = set(source.queue(c).tolist())
        assert set(pos[g].tolist()) <= held
        if c != 11:
            assert len(set(pos[g].tolist())) == 5
        assert set(unc[g].tolist()) <= set(source.unc_queue.tolist())


def test_queue_state_holds_queues_and_positions():
    source = ready("queue")
    source.draw()
    state = source.state_dict()
    assert {"step", "seed", "pushed", "queues", "queue_len", "queue_pos", "unc_queue", "unc_len", "unc_pos"} <= set(
        state
    )
    assert state["queues"].shape == (12, 8) and state["unc_queue"].shape == (16,)
    other = ready("queue", seed=7)
    other.load_state_dict(state)
    for c in range(12):
        assert other.queue(c).tolist() == source.queue(c).tolist()
    assert other.unc_pos == source.unc_pos and other.pushed == source.pushed
