"""WebDataset video pipeline: shards -> decoded, resized clips -> VideoBatch. No Lightning here."""

from vdm.data.pipeline import ClipSampler, VideoShardDataset, collate
from vdm.data.skips import SkipCounter
from vdm.data.source import VideoData

__all__ = ["ClipSampler", "SkipCounter", "VideoData", "VideoShardDataset", "collate"]
