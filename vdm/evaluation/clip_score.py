"""CLIP score and temporal consistency of videos, with an open_clip model (image and text towers).

    clip score            per frame, 100 x the cosine similarity of the frame's CLIP image embedding and
                          the prompt's text embedding, floored at 0, averaged over the frames: CLIPSIM
                          (Wu et al. 2021, GODIVA) with the scaling and floor of torchmetrics' CLIPScore
                          (Hessel et al. 2021), so figures compare with the ones papers report.
    temporal consistency  the cosine similarity of consecutive frames' image embeddings, averaged over
                          the T - 1 pairs: 1 for a still clip, lower as frames change (flicker, jumps).

Both need real CLIP weights to mean anything (`pretrained` or a local `checkpoint`); random weights only
serve tests. Frames are resized and centre-cropped to the image tower's input and normalized with its
own mean and std, as open_clip's preprocessing would.

Shape legend (see vdm/types.py): N clips, C channels, T frames, H height, W width, M frames of all clips,
D embedding width.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import Tensor, nn

from vdm.text.open_clip_models import create_model, get_tokenizer, image_normalization


class ClipScorer(nn.Module):
    """A frozen open_clip model that scores videos against prompts."""

    def __init__(self, model: nn.Module, tokenizer, frame_batch: int = 256):
        super().__init__()
        self.model, self.tokenizer, self.frame_batch = model, tokenizer, frame_batch
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean, std = image_normalization(model)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_open_clip(
        cls, model_name: str, pretrained: str | None = None, checkpoint: str | Path | None = None, seed: int = 0
    ) -> ClipScorer:
        """`pretrained`: an open_clip tag (needs a network or a filled cache); else `checkpoint`, a local
        .safetensors state dict; else random weights that depend only on (model_name, seed)."""
        if checkpoint is not None and Path(checkpoint).suffix != ".safetensors":
            raise ValueError(f"checkpoint must be a .safetensors file ({checkpoint})")  # pickles can run code
        model = create_model(model_name, pretrained, seed)
        if checkpoint is not None:
            model.load_state_dict(load_file(str(checkpoint), device="cpu"), strict=True)
        return cls(model, get_tokenizer(model_name))

    def train(self, mode: bool = True) -> ClipScorer:
        return super().train(False)  # frozen: always in eval mode

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, frames: Tensor) -> Tensor:
        """(M, C, H, W) float in [-1, 1] or uint8, C = 1 or 3 -> (M, 3, h, w) normalized tower input."""
        x = frames.float() / 255.0 if frames.dtype == torch.uint8 else (frames.float() + 1) / 2
        x = x.clamp(0, 1).expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.clamp(0, 1)
        # open_clip's "shortest" resize then centre crop, done on tensors
        h, w = x.shape[-2:]
        scale = max(self.image_size[0] / h, self.image_size[1] / w)
        size = (max(self.image_size[0], round(h * scale)), max(self.image_size[1], round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.image_size[0]) // 2, (size[1] - self.image_size[1]) // 2
        x = x[:, :, top : top + self.image_size[0], left : left + self.image_size[1]]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def image_features(self, frames: Tensor) -> Tensor:
        """(M, C, H, W) -> (M, D) unit-norm image embeddings, `frame_batch` frames at a time."""
        chunks = [
            self.model.encode_image(self.preprocess(chunk.to(self.device)), normalize=True).float()
            for chunk in frames.split(self.frame_batch)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        """N prompts -> (N, D) unit-norm text embeddings."""
        ids = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(ids, normalize=True).float()

    def video_features(self, videos: Tensor) -> Tensor:
        """(N, C, T, H, W) -> (N, T, D) unit-norm image embeddings of every frame."""
        n = videos.shape[0]
        features = self.image_features(rearrange(videos, "n c t h w -> (n t) c h w"))
        return rearrange(features, "(n t) d -> n t d", n=n)

    def clip_score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """(N, C, T, H, W) and N prompts -> (N,) CLIP score in [0, 100], video i against prompt i."""
        if len(videos) != len(prompts):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        return _clip_score(self.video_features(videos), self.text_features(prompts))

    def temporal_consistency(self, videos: Tensor) -> Tensor:
        """(N, C, T, H, W), T >= 2 -> (N,) mean cosine similarity of consecutive frames, in [-1, 1]."""
        _check_frames(videos)
        return _consistency(self.video_features(videos))

    def score(self, videos: Tensor, prompts: list[str]) -> dict[str, float]:
        """Both figures averaged over the N clips (the frames are embedded once for both)."""
        if len(videos) != len(prompts):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        _check_frames(videos)
        frames = self.video_features(videos)
        return {
            "clip_score": _clip_score(frames, self.text_features(prompts)).mean().item(),
            "temporal_consistency": _consistency(frames).mean().item(),
        }


def _clip_score(frames: Tensor, text: Tensor) -> Tensor:
    """(N, T, D) frame and (N, D) text unit embeddings -> (N,) mean over frames of max(100 cos, 0)."""
    return (100 * torch.einsum("ntd,nd->nt", frames, text)).clamp(min=0).mean(dim=1)


def _consistency(frames: Tensor) -> Tensor:
    """(N, T, D) unit embeddings -> (N,) mean cosine similarity of frames t and t + 1."""
    return (frames[:, 1:] * frames[:, :-1]).sum(dim=-1).mean(dim=1)


def _check_frames(videos: Tensor) -> None:
    if videos.shape[2] < 2:
        raise ValueError(f"temporal consistency needs at least 2 frames (got {videos.shape[2]})")
