"""The LightningModule: one diffusion training step over a VideoBatch."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor, nn

from vdm.config_check import ConfigError
from vdm.distributed.parallel import full_value, skipped_steps, steps_inside_engine
from vdm.distributed.sequence import enable as enable_sequence_parallel
from vdm.distributed.sequence import sequence_groups
from vdm.distributed.shards import load_sharded, local_shards, save_sharded, shards_written
from vdm.generate import SamplingSettings, generate
from vdm.models.lora import add_lora
from vdm.models.param_groups import set_trainable
from vdm.seeding import generator_for
from vdm.training.ema import EMA
from vdm.training.optim import AdamW
from vdm.types import TextCond, VideoBatch, with_rows

CAPTION_STREAM = 1  # the caption-dropout draws' own stream, apart from the device's (t, noise)
EMA_KEYS = "ema.net."  # a sharded EMA's keys in a distributed checkpoint's state dict (FSDP2), beside "net."


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


@dataclass
class StepOutputs:
    """What one optimizer step computed, for the callbacks: `training_step` returns it as `outputs["step"]` and
    Lightning hands it to every callback's `on_train_batch_end`. Under gradient accumulation every micro-batch
    of a step returns the same object; `finished` turns true on the last one, when the optimizer step was taken.
    """

    losses: Tensor  # (B,) per-clip loss of the latest micro-batch, detached
    timesteps: Tensor  # (B,) t of each clip of the latest micro-batch, 0 data .. 1 noise
    keys: list[str]  # sample keys of this rank's micro-batches of the step
    losses_finite: Tensor  # () bool: all this rank's losses of the step were finite (a device tensor: no sync)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # train/loss, lr, grad_norm: logged per interval
    finished: bool = False  # the optimizer step was taken (the last micro-batch of the accumulation)
    # the step changed the weights (False: skipped for a non-finite loss or gradient); a device bool tensor where
    # the optimizer skips on the device (fused AdamW), so that no step waits on the host to decide
    applied: Tensor | bool = True


class VideoDiffusion(L.LightningModule):
    """Trains `net` under `objective`, conditioned on captions through a frozen text encoder.

    The text encoder and the autoencoder are held outside the module tree: they are frozen and rebuilt
    identically from their configs (fixed seed or a weights file), so they are kept out of checkpoints, the
    optimizer and the parallel strategy's sharding.
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
        sequence_parallel_size: int = 1,
    ):
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1) (got {caption_dropout})")
        self.net = net
        # staged fine-tuning and LoRA: before any strategy wraps the network (frozen: no gradient, no optimizer state)
        if optim.lora_rank:
            add_lora(net, optim.lora_rank, optim.lora_alpha, list(optim.lora_targets))
        set_trainable(net, optim.trainable)
        self.objective = objective
        self.__dict__["autoencoder"] = autoencoder  # frozen like the text encoder: outside the module tree
        self.optim = optim
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.__dict__["text_encoder"] = text_encoder  # not a submodule: see the class docstring
        self.parallelize = parallelize  # (net, device_mesh) -> net: sharding applied from outside (FSDP2)
        self.ema = ema if ema is not None and ema.enabled else None
        # ranks that share each clip, split by frames (vdm/distributed/sequence.py); they draw the same t and noise
        self.sequence_parallel_size = sequence_parallel_size
        self.current_step: StepOutputs | None = None  # the optimizer step under way (or the last one)
        self.empty_caption: TextCond | None = None  # its features, for dropped captions of cached batches

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if self.parallelize is not None and mesh is not None:
            self.parallelize(self.net, mesh)
        if self.sequence_parallel_size > 1 and self.net.sequence_parallel is None:  # every rank makes the groups
            group = sequence_groups(self.trainer.world_size, self.sequence_parallel_size)
            enable_sequence_parallel(self.net, group)

    @property
    def data_rank(self) -> int:
        """This rank's place among the data-parallel replicas: the ranks of a sequence-parallel group share it
        (the same clips, the same t, noise and dropped captions)."""
        return self.global_rank // self.sequence_parallel_size

    @property
    def data_world_size(self) -> int:
        """How many data-parallel replicas there are: the world size over sequence_parallel_size."""
        return self.trainer.world_size // self.sequence_parallel_size

    def on_fit_start(self) -> None:
        check_backend = getattr(self.net, "check_attention_backend", None)
        if check_backend is not None:  # at start, not at the first step: a backend that cannot run stops here
            try:
                check_backend(self.device, compute_dtype(self.trainer.precision))
            except ValueError as error:
                raise ConfigError(f"model.{error}") from None
        self.text_encoder.to(self.device)
        self.autoencoder.to(self.device)
        if self.ema is not None:
            self.ema.to(self.device)

    def encode_text(self, captions: list[str]) -> TextCond:
        return self.text_encoder.encode(captions)

    def latents(self, batch: VideoBatch) -> Tensor:
        """(B, c, t, h, w) float32 latents of the batch's clips: read from a cached batch, else encoded."""
        if batch.latents is not None:
            return batch.latents.float()
        return self.autoencoder.encode(batch.pixels())

    def condition(self, batch: VideoBatch, captions: list[str]) -> TextCond:
        """The text features of `captions` (the batch's, some dropped to ""): a cached batch has them; the empty
        caption's are encoded once."""
        if batch.text is None:
            return self.encode_text(captions)
        cond = batch.text.float()
        dropped = [caption == "" for caption in captions]
        if any(dropped):
            if self.empty_caption is None:
                self.empty_caption = self.encode_text([""])
            cond = with_rows(cond, dropped, self.empty_caption)
        return cond

    def losses(
        self, batch: VideoBatch, generator: torch.Generator, captions: list[str] | None = None, t: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(per-clip loss (B,), t (B,)) of the objective on `batch`: training and the held-out loss both use it.

        t and the noise are drawn from `generator` unless `t` is given (the held-out loss fixes it; its noise
        is then drawn from `generator`); `captions` replace the batch's (training drops some of them).
        """
        x0 = self.latents(batch)
        if t is None:
            t, noise = self.objective.draw(x0, generator)
        else:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        cond = self.condition(batch, batch.captions if captions is None else captions)
        return self.objective.loss_at(self.net, x0, cond, t, noise), t

    def training_step(self, batch: VideoBatch, batch_idx: int) -> dict:
        # every random draw of this step comes from (seed, rank, step): resumed runs draw the same
        generator, caption_generator = step_generators(self.device, self.seed, self.data_rank, self.global_step)
        captions = self.drop_captions(batch.captions, caption_generator)
        losses, t = self.losses(batch, generator, captions)  # (B,), (B,)
        loss = losses.mean()
        step = self.current_step
        if step is None or step.finished:  # the first micro-batch of an optimizer step
            finite = torch.ones((), dtype=torch.bool, device=self.device)  # made on the device: no host copy
            step = self.current_step = StepOutputs(losses.detach(), t.detach(), [], finite)
        step.losses, step.timesteps = losses.detach(), t.detach()
        step.keys += list(batch.keys)
        # a device tensor: read in the vote after the backward pass, so the forward does not wait on the host
        step.losses_finite = step.losses_finite & torch.isfinite(loss.detach())
        step.metrics = {"train/loss": loss.detach(), "lr": torch.tensor(self.lr_schedulers().get_last_lr()[0])}
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            # Lightning reads every progress-bar value to the host after each step: only on logged steps
            self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return {"loss": loss, "step": step}

    def drop_captions(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """Replace each caption by "" with probability caption_dropout; `generator` is a CPU generator."""
        return drop_captions(captions, self.caption_dropout, generator)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if steps_inside_engine(self.trainer.strategy):
            # DeepSpeed clips inside its step (gradient_clipping in its config) and skips a step whose gradient
            # norm is not finite on any rank by itself; the norm and the skip are read after it
            return
        step = self.current_step
        # clip_grad_norm_ returns the norm before clipping: log it whether or not clipping is on
        max_norm = gradient_clip_val if gradient_clip_val else float("inf")
        norm = full_value(torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm).detach().float())
        step.metrics["grad_norm"] = norm
        # The norm is of the all-reduced gradients, the same on every rank; the local losses are not, so the
        # ranks vote: one rank's NaN skips the step everywhere, and the replicas stay equal.
        bad = (~(torch.isfinite(norm) & step.losses_finite)).float()
        bad = self.trainer.strategy.reduce(bad, reduce_op="sum")  # ranks with a non-finite loss or norm
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # under Lightning's wrapper, if handed one
        if skips_on_device(optimizer):
            # the optimizer skips on the device when found_inf > 0: no host sync in the step
            optimizer.found_inf = (bad > 0).float().reshape(())  # the shape of the step counts it is taken from
            step.applied = bad == 0
        elif bad.item() > 0:  # other optimizers: the host decides (one sync per step)
            for param in self.net.parameters():
                param.grad = None  # the optimizer leaves parameters without gradient (and their states) alone
            step.applied = False

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        strategy = self.trainer.strategy
        skipped_before = skipped_steps(strategy)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # runs the closure: training_step
        step = self.current_step
        if skipped_steps(strategy) != skipped_before:
            step.applied = False
        if self.ema is not None and step.applied is not False:
            # a device tensor: the EMA moves by zero where the step was skipped
            applied = None if step.applied is True else step.applied
            # this rank's shard of each parameter (all of it unless ZeRO-3 or FSDP2 shard it): no communication
            self.ema.step(local_shards(self.net), self.global_step, applied=applied)
        step.finished = True  # the next micro-batch starts a new step's keys and vote

    @contextmanager
    def eval_weights(self, ema: bool = True):
        """The network to sample and evaluate with: its EMA weights when it has them and `ema`, else its own.

        Under ZeRO-3 and FSDP2 each rank copies its EMA shard into its shard of the parameters: every forward
        then gathers the EMA weights as it gathers the trained ones (every rank must be inside)."""
        if ema and self.ema is not None:
            with self.ema.swapped_in(local_shards(self.net), written=lambda: shards_written(self.net)):
                yield self.net
        else:
            yield self.net

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        num_frames: int,
        size: int,
        settings: SamplingSettings,
        ema: bool = True,
        first_index: int = 0,
    ) -> Tensor:
        """One clip per prompt, (N, C, T, H, W) in [-1, 1], with the EMA weights when `ema` and there are some.

        Prompt i's noise is seeded with (settings.seed, first_index + i) (vdm.generate). The caller sets eval mode
        and the precision context; every rank must call it under sharded strategies.
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
                first_index=first_index,
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:  # each rank's shards where the parameters are sharded (vdm.distributed.shards)
            checkpoint["ema"] = save_sharded(self.ema.state_dict(), self.net, checkpoint, EMA_KEYS)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is None:
            return
        if "ema" not in checkpoint:
            raise ValueError("the checkpoint has no EMA weights but this run keeps an EMA (ema.enabled=false to go on)")
        path = getattr(self._trainer, "ckpt_path", None)  # FSDP2 reads its EMA shards from the checkpoint itself
        state = load_sharded(checkpoint["ema"], self.net, path, EMA_KEYS, what="EMA")
        self.ema.load_state_dict(state, like=local_shards(self.net))

    def configure_optimizers(self):
        # built after the strategy moved the network: the optimizer sees where the parameters are (fused on a GPU)
        optimizer, scheduler = self.optim.build(self.net.named_parameters())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def compute_dtype(precision) -> torch.dtype:
    """The dtype matmuls and attention run in under a Lightning precision."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32
