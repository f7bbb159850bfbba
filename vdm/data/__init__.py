"""WebDataset video pipeline: shards -> decoded, resized clips in shape buckets -> VideoBatch. No Lightning here."""

from vdm.data.buckets import Bucket
from vdm.data.clips import ClipMaker, FrameSampling
from vdm.data.pipeline import StreamTracker, VideoShardDataset, collate
from vdm.data.skips import SkipCounter, TooMuchBadData
from vdm.data.source import VideoData
from vdm.data.stream import Source

__all__ = [
    "Bucket",
    "ClipMaker",
    "FrameSampling",
    "SkipCounter",
    "Source",
    "StreamTracker",
    "TooMuchBadData",
    "VideoData",
    "VideoShardDataset",
    "collate",
]
