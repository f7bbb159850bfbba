"""Batches of clips from WebDataset shards, for a DataLoader; and the record of where a stream stands."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vdm.data.cache import collate_cached
from vdm.data.clips import ClipMaker
from vdm.data.skips import SkipCounter
from vdm.data.stream import Source, WorkerStream
from vdm.types import VideoBatch


def collate(samples: list[dict]) -> VideoBatch:
    if "latent" in samples[0]:  # clips of a latent cache
        return collate_cached(samples)
    videos = [s["video"] for s in samples]
    out = None
    if get_worker_info() is not None:
        # in a loader worker, stack straight into shared memory (as torch's default_collate does): the batch
        # then reaches the training process without a second copy
        storage = videos[0]._typed_storage()._new_shared(len(videos) * videos[0].numel(), device=videos[0].device)
        out = videos[0].new(storage).resize_(len(videos), *videos[0].shape)
    return VideoBatch(
        video=torch.stack(videos, out=out),
        captions=[s["caption"] for s in samples],
        keys=[s["key"] for s in samples],
        fps=torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
    )


class VideoShardDataset(IterableDataset):
    """VideoBatches from the shards of one or more sources; each batch has one bucket's shape.

    resampled=True: an endless stream (training): every epoch each source's shards are permuted and
    split across all workers of all ranks, so no sample repeats within an epoch; sources are mixed by
    weight; samples are shuffled in a buffer. resampled=False: one pass in order (evaluation), every
    sample exactly once across workers and ranks.

    Each batch carries `stream_state`: the worker's position after it, and for each clip the raw sample it
    was made from, (source, epoch, shard number, sample index). A dataset created with `resume` (what
    StreamTracker recorded) continues exactly where the batches trained on ended; for a position saved
    under another number of ranks or workers, vdm.data.reshard.carry_over re-derives `resume` first.
    """

    def __init__(
        self,
        sources: Sequence[Source] | Sequence[str],
        clip_maker: ClipMaker,
        *,
        resampled: bool,
        seed: int = 0,
        shuffle_buffer: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        skips: SkipCounter | None = None,
        resume: dict | None = None,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) (rank={rank}, world_size={world_size})")
        # a plain list of shard URLs is one source
        self.sources = list(sources) if all(isinstance(s, Source) for s in sources) else [Source(tuple(sources))]
        self.clip_maker = clip_maker
        self.resampled, self.seed, self.shuffle_buffer = resampled, seed, shuffle_buffer
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.skips = skips if skips is not None else SkipCounter()
        self.resume = resume

    def __iter__(self) -> Iterator[VideoBatch]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader takes batch i from worker i % num_workers. After `batches` trained batches the next
        # comes from logical worker batches % num_workers, so the worker started first plays that one.
        resume = self.resume if self.resume and self.resume.get("positions") else {}  # none: a fresh start
        if resume and resume.get("num_workers") != num_workers:
            raise ValueError(
                f"the stream position was saved with {resume.get('num_workers')} loader workers, this loader has "
                f"{num_workers}: re-derive it for this layout with vdm.data.reshard.carry_over"
            )
        worker = (physical + resume.get("batches", 0)) % num_workers
        positions = {int(k): v for k, v in resume.get("positions", {}).items()}
        stream = WorkerStream(
            self.sources,
            self.clip_maker,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            resampled=self.resampled,
            shuffle_buffer=self.shuffle_buffer,
            skips=self.skips,
            drop_last=self.drop_last,
            position=positions.get(worker),
        )
        for _, clips, position, references in stream:
            batch = collate(clips)
            batch.stream_state = {
                "worker": worker,
                "num_workers": num_workers,
                "position": position,
                "samples": [list(r) for r in references],
            }
            yield batch


class StreamTracker:
    """Where the stream stands for the batches actually trained on (a loader may have prefetched more).

    Call `update` with each batch as it is trained on; `state()` is what a VideoShardDataset resumes from.
    """

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.batches = state.get("batches", 0)
        self.num_workers = state.get("num_workers")
        self.positions = {int(k): v for k, v in state.get("positions", {}).items()}

    def update(self, batch: VideoBatch) -> None:
        stream_state = batch.stream_state
        if stream_state is None:
            return
        self.positions[stream_state["worker"]] = stream_state["position"]
        self.num_workers = stream_state["num_workers"]
        self.batches += 1

    def state(self) -> dict:
        return {"batches": self.batches, "num_workers": self.num_workers, "positions": dict(self.positions)}
