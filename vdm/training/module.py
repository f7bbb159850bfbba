"""The LightningModule: one diffusion training step over a VideoBatch."""

from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch
from torch import Tensor, nn

from vdm.config_check import ConfigError
from vdm.generate import SamplingSettings, generate
from vdm.training.ema import EMA
from vdm.training.optim import AdamW
from vdm.training.seeding import generator_for
from vdm.types import TextCond, VideoBatch

CAPTION_STREAM = 1  # the caption-dropout draws' own stream, apart from the device's (t, noise)


def is_deepspeed(strategy) -> bool:
    return hasattr(strategy, "deepspeed_engine")


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with `probability` (trains the unconditional model for CFG).

    `generator` is a CPU generator: the captions are host data, and a draw on the GPU would have to be read
    back to the host, which waits for every kernel queued before it.
    """
    drop = torch.rand(len(captions), generator=generator).numpy() < probability
    return ["" if dropped else caption for caption, dropped in zip(captions, drop)]


def step_generators(device: torch.device, seed: int, rank: int, step: int) -> tuple[torch.Generator, torch.Generator]:
    """(device generator for t and noise, CPU generator for caption dropout), each a function of (seed, rank, step)."""
    return generator_for(device, seed, rank, step), generator_for(torch.device("cpu"), seed, rank, step, CAPTION_STREAM)


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step` reads `optimizer.found_inf` and skips the update on the device when it is non-zero.

    torch's fused Adam/AdamW do (it is how GradScaler skips a step without a host sync): the parameters, the
    moments and the step count are left exactly as they were.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


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
        ema: EMA | None = None,
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
        self.ema = ema if ema is not None and ema.enabled else None
        self.step_metrics: dict[str, Tensor] = {}
        # what the last optimizer step saw, for the callbacks (metrics per timestep, the non-finite guard)
        self.step_timesteps: Tensor | None = None  # (B,) t of each clip, 0 data .. 1 noise
        self.step_losses: Tensor | None = None  # (B,) per-clip loss
        self.step_keys: list[str] = []  # sample keys of this rank's batches since the last optimizer step
        self.step_losses_finite: Tensor | bool = True  # this rank's losses since the last optimizer step: all finite
        # the last optimizer step changed the weights (False: skipped, non-finite); a device bool tensor where the
        # optimizer skips on the device (fused AdamW), so that no step waits on the host to decide
        self.step_applied: Tensor | bool = True
        self.step_finished = True

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if self.parallelize is not None and mesh is not None:
            self.parallelize(self.net, mesh)

    def on_fit_start(self) -> None:
        check_backend = getattr(self.net, "check_attention_backend", None)
        if check_backend is not None:  # at start, not at the first step: a backend that cannot run stops here
            try:
                check_backend(self.device, compute_dtype(self.trainer.precision))
            except ValueError as error:
                raise ConfigError(f"model.{error}") from None
        self.text_encoder.to(self.device)
        if self.ema is not None:
            self.ema.to(self.device)

    def encode_text(self, captions: list[str]) -> TextCond:
        return self.text_encoder.encode(captions)

    def training_step(self, batch: VideoBatch, batch_idx: int) -> Tensor:
        # every random draw of this step comes from (seed, rank, step): resumed runs draw the same
        generator, caption_generator = step_generators(self.device, self.seed, self.global_rank, self.global_step)
        captions = self.drop_captions(batch.captions, caption_generator)
        if self.step_finished:
            self.step_keys, self.step_finished = [], False
            self.step_losses_finite = torch.ones((), dtype=torch.bool, device=self.device)  # no host copy
        x0 = self.autoencoder.encode(batch.pixels())
        t, noise = self.objective.draw(x0, generator)
        losses = self.objective.loss_at(self.net, x0, self.encode_text(captions), t, noise)  # (B,)
        loss = losses.mean()
        self.step_timesteps, self.step_losses = t.detach(), losses.detach()
        self.step_keys += list(batch.keys)
        # a device tensor: read in the vote after the backward pass, so the forward does not wait on the host
        self.step_losses_finite = self.step_losses_finite & torch.isfinite(loss.detach())
        self.step_metrics = {"train/loss": loss.detach(), "lr": torch.tensor(self.lr_schedulers().get_last_lr()[0])}
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            # Lightning reads every progress-bar value to the host after each step: only on logged steps
            self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def drop_captions(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """Replace each caption by "" with probability caption_dropout; `generator` is a CPU generator."""
        return drop_captions(captions, self.caption_dropout, generator)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if is_deepspeed(self.trainer.strategy):
            # DeepSpeed clips inside its step (gradient_clipping in its config) and skips a step whose gradient
            # norm is not finite on any rank by itself; the norm and the skip are read after it
            return
        # clip_grad_norm_ returns the norm before clipping: log it whether or not clipping is on
        max_norm = gradient_clip_val if gradient_clip_val else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm)
        norm = norm.detach().float().full_tensor() if hasattr(norm, "full_tensor") else norm.detach()
        self.step_metrics["grad_norm"] = norm
        # The norm is of the all-reduced gradients, the same on every rank; the local losses are not, so the
        # ranks vote: one rank's NaN skips the step everywhere, and the replicas stay equal.
        bad = (~(torch.isfinite(norm) & self.step_losses_finite)).float()
        bad = self.trainer.strategy.reduce(bad, reduce_op="sum")  # ranks with a non-finite loss or norm
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # under Lightning's wrapper, if handed one
        if skips_on_device(optimizer):
            # the optimizer skips on the device when found_inf > 0: no host sync in the step
            optimizer.found_inf = (bad > 0).float().reshape(())  # the shape of the step counts it is taken from
            self.step_applied = bad == 0
        elif bad.item() > 0:  # other optimizers: the host decides (one sync per step)
            for param in self.net.parameters():
                param.grad = None  # the optimizer leaves parameters without gradient (and their states) alone
            self.step_applied = False

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        self.step_applied = True  # until the clipping hook or DeepSpeed says otherwise
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        skipped_before = engine.skipped_steps if engine is not None else 0
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if engine is not None and engine.skipped_steps != skipped_before:
            self.step_applied = False
        if self.ema is not None and self.step_applied is not False:
            # a device tensor: the EMA moves by zero where the step was skipped
            applied = None if self.step_applied is True else self.step_applied
            self.ema.step(self.net.named_parameters(), self.global_step, applied=applied)
        self.step_finished = True  # the next micro-batch starts a new step's keys and vote

    @contextmanager
    def eval_weights(self, ema: bool = True):
        """The network to sample and evaluate with: its EMA weights when it has them and `ema`, else its own."""
        if ema and self.ema is not None:
            with self.ema.swapped_in(self.net) as net:
                yield net
        else:
            yield self.net

    @torch.no_grad()
    def sample(
        self, prompts: list[str], *, num_frames: int, size: int, settings: SamplingSettings, ema: bool = True
    ) -> Tensor:
        """One clip per prompt, (N, C, T, H, W) in [-1, 1], with the EMA weights when `ema` and there are some.

        The caller sets eval mode and the precision context; every rank must call it under sharded strategies.
        """
        with self.eval_weights(ema) as net:
            return generate(
                net,
                self.text_encoder,
                self.autoencoder,
                self.objective,
                prompts,
                num_frames=num_frames,
                size=size,
                settings=settings,
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is None:
            return
        if "ema" not in checkpoint:
            raise ValueError("the checkpoint has no EMA weights but this run keeps an EMA (ema.enabled=false to go on)")
        self.ema.load_state_dict(checkpoint["ema"])

    def configure_optimizers(self):
        # built after the strategy moved the network: the optimizer sees where the parameters are (fused on a GPU)
        optimizer, scheduler = self.optim.build(p for p in self.net.parameters() if p.requires_grad)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def compute_dtype(precision) -> torch.dtype:
    """The dtype matmuls and attention run in under a Lightning precision."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32
