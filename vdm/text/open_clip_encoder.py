"""OpenCLIP's text tower as a frozen caption encoder (Radford et al. 2021, CLIP; Cherti et al. 2023).

Shape legend (see vdm/types.py): B captions, L tokens (trimmed to the longest caption in the batch),
D text width (the text transformer's width).
"""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.model import CLIP, CustomTextCLIP, convert_to_custom_text_state_dict
from open_clip.transformer import TextTransformer, text_global_pool
from safetensors.torch import load_file
from torch import Tensor, nn

from vdm.state_dicts import diff_state_dicts
from vdm.text.open_clip_models import create_model, get_tokenizer
from vdm.types import TextCond


def _is_text_key(key: str) -> bool:
    # everything in an open_clip state dict that is not the image tower or the contrastive temperature
    return not key.startswith("visual.") and key not in ("logit_scale", "logit_bias")


class OpenCLIPTextEncoder(nn.Module):
    """Captions -> TextCond with an open_clip text transformer, frozen and always in eval mode.

    tokens are the per-token features after ln_final, (B, L, D). pooled is CLIP's text embedding,
    the end-of-text token's feature projected by text_projection (exactly `encode_text`), when that
    projection keeps the width D; when it changes the width, pooled is the EOT feature before the
    projection, so that tokens and pooled are both D wide (the DiT reads both with one `text_dim`).
    `pooled_is_projected` says which one this model gives.

    Weights come from `pretrained` (an open_clip tag, needs a network or a filled cache), else from a
    local `checkpoint` (.safetensors only), else a random init that depends only on (model_name, seed),
    so a resumed run rebuilds the identical frozen encoder without saving it.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        checkpoint: str | Path | None = None,
        seed: int = 0,
        max_length: int | None = None,
    ):
        super().__init__()
        # SOT and EOT take two positions; fewer leaves no room for a caption
        if max_length is not None and (
            not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2
        ):
            raise ValueError(f"max_length must be an int >= 2 or None (max_length={max_length!r})")
        if checkpoint is not None and Path(checkpoint).suffix != ".safetensors":
            # pickled formats (.pt, .bin, .ckpt) can run code when loaded; we never unpickle external files
            raise ValueError(f"checkpoint must be a .safetensors file; only .safetensors is accepted ({checkpoint})")

        # The random init must not depend on the caller's RNG state, nor change it.
        model = create_model(model_name, pretrained, seed)

        if isinstance(model, CLIP):
            pool_type, eos_id, pad_id = model.text_pool_type, model.text_eos_id, 0
        elif (
            isinstance(model, CustomTextCLIP)
            and isinstance(model.text, TextTransformer)
            and model.text.cls_emb is None  # CoCa-style appended class token: tokens and pooled differ
            and not model.text.use_pad_mask
        ):
            pool_type, eos_id, pad_id = model.text.pool_type, model.text.eos_id, model.text.pad_id
        else:
            raise ValueError(
                f"open_clip model {model_name!r} ({type(model).__name__}) is not supported: "
                "OpenCLIPTextEncoder needs a CLIP or CustomTextCLIP with a causal or plain TextTransformer text tower"
            )
        # Keep only the text tower: the image tower is most of the memory and is never used.
        del model.visual, model.logit_scale, model.logit_bias
        self.model = model
        self.model_name = model_name
        self._pool_type, self._eos_id, self._pad_id = pool_type, eos_id, pad_id

        tower = self._tower
        self.width = tower.transformer.width
        projection = tower.text_projection
        if projection is None:
            self.embed_dim = self.width
        elif isinstance(projection, nn.Linear):
            self.embed_dim = projection.out_features
        else:
            self.embed_dim = projection.shape[1]
        self.pooled_is_projected = projection is not None and self.embed_dim == self.width

        self.context_length = model.context_length if max_length is None else min(max_length, model.context_length)
        self.tokenizer = get_tokenizer(model_name)

        if checkpoint is not None:
            self.load_text_state_dict(load_file(str(checkpoint), device="cpu"))
        self.requires_grad_(False)
        self.eval()

    @property
    def _tower(self) -> nn.Module:
        # the module holding token_embedding ... text_projection: the CLIP itself, or CustomTextCLIP.text
        return self.model.text if isinstance(self.model, CustomTextCLIP) else self.model

    @property
    def dim(self) -> int:
        """Width of tokens and of pooled: the DiT's `text_dim`."""
        return self.width

    @property
    def pooled_dim(self) -> int:
        return self.width  # see the class docstring: pooled is kept D wide

    @property
    def device(self) -> torch.device:
        return self._tower.token_embedding.weight.device

    def train(self, mode: bool = True) -> OpenCLIPTextEncoder:
        # Frozen: stays in eval mode even when a parent module is put into training mode.
        return super().train(False)

    def text_state_dict(self) -> dict[str, Tensor]:
        """The text tower's weights under open_clip's own key names (what a checkpoint may hold)."""
        return self.model.state_dict()

    def load_text_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load a full open_clip state dict or a text-only one; every text-tower key must match."""
        if isinstance(self.model, CustomTextCLIP):
            state_dict = convert_to_custom_text_state_dict(state_dict)  # CLIP layout -> text.* keys
        given = {k: v for k, v in state_dict.items() if _is_text_key(k)}
        diff = diff_state_dicts(self.model.state_dict(), given)
        if diff:
            wrong_shape = [f"{k}: {shape} != {expected}" for k, shape, expected in diff.wrong_shape]
            raise ValueError(
                f"checkpoint does not match the text tower of {self.model_name!r}: "
                f"missing text keys {diff.missing}, unexpected text keys {diff.unexpected}, wrong shapes {wrong_shape}"
            )
        self.model.load_state_dict(given, strict=True)

    def _features(self, ids: Tensor) -> Tensor:
        # ids (B, L) -> (B, L, D) after ln_final; the same steps as open_clip's CLIP.encode_text
        tower = self._tower
        L = ids.shape[1]
        cast_dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(ids).to(cast_dtype) + tower.positional_embedding[:L].to(cast_dtype)
        attn_mask = tower.attn_mask[:L, :L] if tower.attn_mask is not None else None  # causal, or None
        x = tower.transformer(x, attn_mask=attn_mask)
        return tower.ln_final(x)

    def _project(self, pooled: Tensor) -> Tensor:
        projection = self._tower.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextCond:
        if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions must be a non-empty list of str (got {type(captions).__name__})")
        ids = self.tokenizer(list(captions), context_length=self.context_length)  # (B, L), on the host
        # Padding carries nothing the masked attention downstream reads: drop the columns no caption uses. The
        # length is read from the host's ids (numpy), not the device's, which would wait for the GPU.
        length = int((ids.numpy() != self._pad_id).sum(axis=1).max())
        ids = ids.to(self.device, non_blocking=True)
        x = self._features(ids)  # (B, L, D)
        pooled = text_global_pool(x, ids, self._pool_type, eos_token_id=self._eos_id)  # (B, D)
        if self.pooled_is_projected:
            pooled = self._project(pooled)
        mask = ids[:, :length] != self._pad_id  # (B, length) True on SOT .. EOT
        return TextCond(tokens=x[:, :length].float(), mask=mask, pooled=pooled.float())
