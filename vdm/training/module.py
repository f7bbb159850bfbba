"""The LightningModule: one diffusion training step over a VideoBatch."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from vdm.training.optim import AdamW
from vdm.training.seeding import generator_for
from vdm.types import TextCond, VideoBatch


def is_deepspeed(strategy) -> bool:
    return hasattr(strategy, "deepspeed_engine")


class VideoDiffusion(L.LightningModule):
    """Trains `net` under `objective`, conditioned on captions through a frozen text encoder.

    The text encoder is held outside the module tree: it is frozen and rebuilt identically from its
    config (fixed seed or a weights file), so it is kept out of checkpoints, the optimizer and the
    parallel strategy's sharding.
    """

    def __init__(
        self,
        net: nn.Module,
        objective,
        text_encoder: nn.Module,
        autoencoder: nn.Module,
        optim: AdamW,
        *,
        seed: int = 0,
        caption_dropout: float = 0.1,
        parallelize=None,
    ):
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1) (got {caption_dropout})")
        self.net = net
        self.objective = objective
        self.autoencoder = autoencoder
        self.optim = optim
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.__dict__["text_encoder"] = text_encoder  # not a submodule: see the class docstring
        self.parallelize = parallelize  # (net, device_mesh) -> net: sharding applied from outside (FSDP2)
        self.step_metrics: dict[str, Tensor] = {}

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if self.parallelize is not None and mesh is not None:
            self.parallelize(self.net, mesh)

    def on_fit_start(self) -> None:
        self.text_encoder.to(self.device)

    def encode_text(self, captions: list[str]) -> TextCond:
        return self.text_encoder.encode(captions)

    def training_step(self, batch: VideoBatch, batch_idx: int) -> Tensor:
        # every random draw of this step comes from (seed, rank, step): resumed runs draw the same
        generator = generator_for(self.device, self.seed, self.global_rank, self.global_step)
        captions = self.drop_captions(batch.captions, generator)
        x0 = self.autoencoder.encode(batch.pixels())
        loss = self.objective(self.net, x0, self.encode_text(captions), generator).mean()
        self.step_metrics = {"train/loss": loss.detach(), "lr": torch.tensor(self.lr_schedulers().get_last_lr()[0])}
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def drop_captions(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """Replace each caption by "" with probability caption_dropout (trains the unconditional model for CFG)."""
        drop = torch.rand(len(captions), generator=generator, device=generator.device) < self.caption_dropout
        return ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if is_deepspeed(self.trainer.strategy):
            return  # DeepSpeed clips inside its step (gradient_clipping in its config); the norm is read after it
        # clip_grad_norm_ returns the norm before clipping: log it whether or not clipping is on
        max_norm = gradient_clip_val if gradient_clip_val else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm)
        self.step_metrics["grad_norm"] = (
            norm.detach().float().full_tensor() if hasattr(norm, "full_tensor") else norm.detach()
        )

    def configure_optimizers(self):
        optimizer, scheduler = self.optim.build(p for p in self.net.parameters() if p.requires_grad)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
