"""A training stream saved under one layout (ranks x loader workers) and resumed under another.

The promise: in every pass (epoch of a source) begun, each sample is trained on exactly once, counting the
batches trained before the change and after it; an unchanged layout still resumes exactly.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.data.test_pipeline import clip_members, make_shards
from vdm.data import StreamTracker, VideoData
from vdm.data.reshard import carry_over
from vdm.data.stream import epoch_order

SEED = 5
PASSES = (0, 1)  # the passes checked: both begun before the (last) change


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> VideoData:
    """Two sources of 8 shards x 4 clips, two shapes (batches of 3 and 2), a shuffle buffer, random crops."""
    root = tmp_path_factory.mktemp("reshard")
    square = make_shards(root, "q", 8, 4, members=lambda: clip_members(num_frames=12))
    wide = make_shards(root, "w", 8, 4, members=lambda: clip_members(num_frames=12, height=16, width=24))
    return VideoData(
        sources=[{"shards": square, "weight": 1.0}, {"shards": wide, "weight": 1.0}],
        buckets=[
            {"frames": 4, "height": 16, "width": 16, "batch_size": 3},
            {"frames": 4, "height": 16, "width": 24, "batch_size": 2},
        ],
        frame_stride=2,
        shuffle_buffer=4,
    )


def train(data: VideoData, layout: tuple[int, int], states: list[dict], until) -> tuple[list[dict], list]:
    """Train on the streams of `layout` (ranks, workers) from `states`, a batch per rank in turn, until
    `until(trackers)`: the trackers' states after, and (key, source, pass) of each clip trained on."""
    world_size, data.num_workers = layout
    streams = [
        iter(data.train_loader(SEED, rank=r, world_size=world_size, resume=states[r])) for r in range(world_size)
    ]
    trackers = [StreamTracker(state) for state in states]
    trained = []
    while not until(trackers):
        for stream, tracker in zip(streams, trackers):
            batch = next(stream)
            tracker.update(batch)
            trained += [(key, ref[0], ref[1]) for key, ref in zip(batch.keys, batch.stream_state["samples"])]
    return [tracker.state() for tracker in trackers], trained


def batches(n: int):
    return lambda trackers: sum(t.batches for t in trackers) >= n


def past(passes: int):
    """True once no tracked position holds anything of a pass below `passes` any more."""

    def done(trackers):
        for tracker in trackers:
            for w in range(tracker.num_workers or 0):
                position = tracker.positions.get(w)
                if position is None or any(units for units in position["backlog"]):
                    return False
                held = [*position["buffer"], *(e[1:] for es in position["pending"].values() for e in es)]
                if min(c[0] for c in position["cursors"]) < passes or any(r[1] < passes for r in held):
                    return False
        return True

    return done


def passes_begun(states: list[dict], source: int) -> set[int]:
    """The latest pass each worker of the saved states had begun reading, for `source`."""
    cursors = [p["cursors"][source] for state in states for p in state["positions"].values()]
    return {epoch - 1 if (index, start) == (0, 0) else epoch for epoch, index, start in cursors}


@pytest.mark.parametrize(
    ("layouts", "trained_batches"),
    [
        ([(2, 2), (1, 1)], [16]),  # fewer processes
        ([(1, 2), (2, 2)], [26]),  # more processes
        ([(1, 2), (1, 1)], [26]),  # fewer loader workers only
        ([(2, 2), (1, 2), (2, 1)], [16, 12]),  # changed again before the first change's backlog was read
    ],
    ids=["2x2-1x1", "1x2-2x2", "1x2-1x1", "2x2-1x2-2x1"],
)
def test_a_changed_layout_trains_every_sample_of_each_pass_begun_exactly_once(mixture, layouts, trained_batches):
    states = [{} for _ in range(layouts[0][0])]
    trained, straddled = [], False
    for layout, following, count in zip(layouts, layouts[1:], trained_batches):
        states, more = train(mixture, layout, states, batches(count))
        trained += more
        # not vacuous: some workers had begun pass 1 while others were still reading pass 0
        straddled |= any(len(passes_begun(states, source)) > 1 for source in (0, 1))
        states = carry_over(states, mixture.train_sources, seed=SEED, world_size=following[0], num_workers=following[1])
    assert straddled
    states, more = train(mixture, layouts[-1], states, past(len(PASSES)))
    trained += more

    for source, prefix in enumerate("qw"):
        everything = Counter(f"{prefix}{shard}k{i}" for shard in range(8) for i in range(4))
        for epoch in PASSES:
            keys = Counter(key for key, s, e in trained if (s, e) == (source, epoch))
            assert keys == everything, (
                f"source {source}, pass {epoch}: {keys - everything} repeated, {everything - keys} lost"
            )


def test_an_unchanged_layout_keeps_the_saved_states_and_a_carried_over_stream_resumes_exactly(mixture):
    states, _ = train(mixture, (2, 2), [{}, {}], batches(5))
    assert carry_over(states, mixture.train_sources, seed=SEED, world_size=2, num_workers=2) == states
    assert carry_over([{}, {}], mixture.train_sources, seed=SEED, world_size=1, num_workers=1) == [{}]

    # mid-backlog, a position of the new layout restores exactly like any other
    carried = carry_over(states, mixture.train_sources, seed=SEED, world_size=1, num_workers=2)
    mixture.num_workers = 2
    reference = iter(mixture.train_loader(SEED, resume=carried[0]))
    uninterrupted = [next(reference) for _ in range(7)]
    interrupted = iter(mixture.train_loader(SEED, resume=carried[0]))
    tracker = StreamTracker(carried[0])
    for _ in range(3):
        tracker.update(next(interrupted))
    assert any(units for p in tracker.state()["positions"].values() for units in p["backlog"])
    restored = iter(mixture.train_loader(SEED, resume=tracker.state()))
    for expected in uninterrupted[3:]:
        batch = next(restored)
        assert batch.keys == expected.keys and torch.equal(batch.video, expected.video)


def test_a_position_from_before_shards_were_named_by_number_still_restores_exactly(mixture):
    mixture.num_workers = 0
    stream = iter(mixture.train_loader(SEED))
    tracker = StreamTracker()
    for _ in range(4):
        tracker.update(next(stream))
    expected = [next(stream) for _ in range(3)]

    # the earlier format: references held the shard's index in the worker's list of that epoch; no backlog
    def index_in_list(ref):
        source, epoch, shard, sample = ref
        order = epoch_order(SEED, source, len(mixture.train_sources[source].shards), epoch, True)
        return [source, epoch, order.index(shard), sample]

    old = dict(tracker.state()["positions"][0])
    del old["backlog"]
    old["buffer"] = [index_in_list(r) for r in old["buffer"]]
    old["pending"] = {b: [[e[0], *index_in_list(e[1:])] for e in es] for b, es in old["pending"].items()}
    restored = iter(mixture.train_loader(SEED, resume=tracker.state() | {"positions": {0: old}}))
    for batch in expected:
        assert next(restored).keys == batch.keys
