"""The training step never waits on the host: no value of a tensor is read back inside a step.

On a GPU, reading a device tensor's value (`.item()`, `bool(t)`, `int(t)`, `.tolist()`, `.cpu()`) or running
an op whose output size depends on values (nonzero, boolean-mask indexing, unique, ...) makes the host wait for
every kernel queued before it, and the GPU then idles while the host catches up. There is no GPU here, so
the test watches for those reads themselves while a real vdm run trains on the CPU: a dispatch mode sees every
ATen op the step runs (`.item()`, `bool()`, `int()` and `float()` all go through `_local_scalar_dense`), and
`Tensor.tolist` / `Tensor.cpu` (which read without an op on a CPU tensor) are wrapped. `.numpy()` is not
watched: it fails on a GPU tensor, so it can only ever read host data (the tokenizer's ids, say).

The negative control (the unfused optimizer, whose non-finite vote the host decides) shows the watch sees a
read when there is one.
"""

from __future__ import annotations

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

# isort: split
import traceback

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vdm.autoencoders import IdentityAutoencoder
from vdm.diffusion import RectifiedFlow
from vdm.models import SpaceTimeDiT
from vdm.text import OpenCLIPTextEncoder
from vdm.training.bench import batch_loader, make_batches, per_step_callbacks
from vdm.training.ema import EMA
from vdm.training.module import VideoDiffusion
from vdm.training.optim import AdamW
from vdm.training.run_dir import RunDir
from vdm.training.trainer import TrainerSettings

SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim"}


class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's values to the host, with where in vdm or Lightning it came from."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/vdm/" in f.filename or "/lightning/" in f.filename]
        where = f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        self.reads.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None
        )
        if name in SYNCING_OPS or name.startswith("repeat_interleave") or bool_index:
            self.record(str(func))
        return func(*args, **(kwargs or {}))


class WatchSteps(L.Callback):
    """Watches the steps with batch_idx in `window` from their start to the end of every callback (it is the
    last callback): the training step, backward, clipping, vote, optimizer, EMA and all per-step callbacks."""

    def __init__(self, window: range):
        self.window, self.mode = window, HostReads()
        self.active = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.window:
            self.active = True
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.active:
            self.mode.__exit__(None, None, None)
            self.active = False


def watched_run(tmp_path, monkeypatch, *, fused: bool) -> list[str]:
    torch.manual_seed(0)
    text = OpenCLIPTextEncoder("clip-tiny")
    net = SpaceTimeDiT(in_channels=3, text_dim=text.dim, width=32, depth=2, heads=2, patch_size=(1, 4, 4))
    module = VideoDiffusion(
        net, RectifiedFlow(), text, IdentityAutoencoder(), AdamW(warmup_steps=2, fused=fused), ema=EMA(decay=0.9)
    )
    settings = TrainerSettings(
        max_steps=6, accelerator="cpu", devices=1, log_every_n_steps=5, progress_bar=True, checkpoint_every_n_steps=0
    )
    watch = WatchSteps(range(1, 4))  # steady steps: after the first, before the logged step 5 and the last
    for method in ("tolist", "cpu"):
        real = getattr(torch.Tensor, method)

        def wrapped(self, *args, _real=real, _method=method, **kwargs):
            if watch.active:
                watch.mode.record(f"Tensor.{_method}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, wrapped)
    run_dir = RunDir(tmp_path / "run").create()
    trainer = settings.build([*per_step_callbacks(run_dir, settings), watch], logger=None)  # train.py's per-step ones
    trainer.fit(module, train_dataloaders=batch_loader(make_batches(6, 2, 3, 4, 16, 16)))
    assert trainer.global_step == 6
    return watch.mode.reads


def test_a_training_step_reads_nothing_back_to_the_host(tmp_path, monkeypatch):
    reads = watched_run(tmp_path, monkeypatch, fused=True)
    assert reads == []


def test_the_watch_sees_the_unfused_optimizers_host_vote(tmp_path, monkeypatch):
    reads = watched_run(tmp_path, monkeypatch, fused=False)
    # one per watched step; the unfused AdamW also reads its step counts, which it keeps on the host
    votes = [r for r in reads if "_local_scalar_dense" in r and "bad.item()" in r]
    assert len(votes) == 3, reads


def enumerate_named(params: list) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"blocks.{i}.weight", p) for i, p in enumerate(params)]


def adamw_steps(fused: bool, found_inf_at: int | None = None) -> tuple[list[torch.Tensor], dict]:
    """Five AdamW steps (vdm's settings) on fixed parameters and gradients; `found_inf_at`: a step skipped the way
    the module skips a non-finite one on the device (found_inf = 1)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    optimizer, scheduler = AdamW(lr=1e-2, weight_decay=0.1, warmup_steps=2, fused=fused).build(enumerate_named(params))
    for step in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        if step == found_inf_at:
            optimizer.found_inf = torch.ones(())
        optimizer.step()
        scheduler.step()
        optimizer.found_inf = torch.zeros(()) if fused else None
    return [p.detach().clone() for p in params], optimizer.state_dict()["state"]


def test_fused_adamw_trains_like_the_unfused_one():
    fused, _ = adamw_steps(fused=True)
    unfused, _ = adamw_steps(fused=False)
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # the same update, up to rounding


def test_a_step_fused_adamw_skips_on_the_device_changes_nothing():
    skipped, state = adamw_steps(fused=True, found_inf_at=4)  # the last of five steps skipped
    _, applied_state = adamw_steps(fused=True)
    assert int(state[0]["step"]) == 4 and int(applied_state[0]["step"]) == 5  # the step count did not advance
    for a, b in zip(skipped, adamw_four_steps()):  # the parameters are those after step 4, bit for bit
        assert torch.equal(a, b)


def adamw_four_steps() -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    optimizer, scheduler = AdamW(lr=1e-2, weight_decay=0.1, warmup_steps=2, fused=True).build(enumerate_named(params))
    for step in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        optimizer.step()
        scheduler.step()
    return [p.detach().clone() for p in params]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
