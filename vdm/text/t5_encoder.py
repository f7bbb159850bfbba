"""T5's encoder as a frozen caption encoder (Raffel et al. 2020), the text features PixArt was trained with.

Shape legend (see vdm/types.py): B captions, L tokens (trimmed to the longest caption in the batch),
D the encoder's width (4096 for T5-v1.1-XXL, PixArt's).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

from vdm.local_weights import check_source
from vdm.types import TextCond


class T5TextEncoder(nn.Module):
    """Captions -> TextCond with transformers' T5EncoderModel, frozen and always in eval mode.

    tokens are the encoder's last hidden states, (B, L, D), with the tokenizer's mask. T5 has no pooled
    vector; pooled is the mean of the real tokens' features (PixArt reads none: model.pooled_text=false).

    Weights come from `path`, a local folder as transformers writes it (config.json and model.safetensors,
    sharded or not, e.g. a PixArt pipeline's `text_encoder/`), with its tokenizer from `tokenizer` (a folder,
    e.g. the pipeline's `tokenizer/`; default `path`). Nothing is downloaded and pickled weights are refused.
    Without `path`, `config` (T5Config arguments) builds a random encoder that depends only on (config, seed),
    with the byte-level ByT5 tokenizer, which needs no vocabulary file: for tests and CPU runs.
    Captions longer than `max_length` tokens are cut there (PixArt-alpha: 120, PixArt-Sigma: 300).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        tokenizer: str | Path | None = None,
        config: dict | None = None,
        seed: int = 0,
        max_length: int = 120,
        dtype: str = "float32",
    ):
        super().__init__()
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length must be a positive int (max_length={max_length!r})")
        torch_dtype = check_source(path, config, "T5 encoder", dtype)
        if path is not None:
            path = Path(path)
            self.model = T5EncoderModel.from_pretrained(
                path, local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype
            )
            self.tokenizer = AutoTokenizer.from_pretrained(Path(tokenizer or path), local_files_only=True)
        else:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG is neither used nor changed
                torch.manual_seed(seed)
                self.model = T5EncoderModel(T5Config(**config)).to(torch_dtype)
            self.tokenizer = ByT5Tokenizer()
            if self.model.config.vocab_size < len(self.tokenizer):
                raise ValueError(
                    f"config vocab_size={self.model.config.vocab_size} is smaller than the ByT5 tokenizer's "
                    f"{len(self.tokenizer)} ids"
                )
        self.max_length = max_length
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        """Width of tokens and of pooled: the DiT's `text_dim`."""
        return self.model.config.d_model

    @property
    def pooled_dim(self) -> int:
        return self.dim

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def train(self, mode: bool = True) -> T5TextEncoder:
        # Frozen: stays in eval mode even when a parent module is put into training mode.
        return super().train(False)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextCond:
        if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions must be a non-empty list of str (got {type(captions).__name__})")
        # padded to the longest caption only: T5's encoder masks padding out of every real token's attention,
        # so the real tokens' features are those of PixArt's pipeline, which pads to max_length
        batch = self.tokenizer(
            list(captions), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        tokens = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, L, D)
        weights = mask.unsqueeze(-1).float()  # (B, L, 1)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D): mean of the real tokens
        return TextCond(tokens=tokens, mask=mask.bool(), pooled=pooled)
