"""The one use of Lightning's private checkpoint API (vdm.training.checkpoint_io.checkpoint_state), held to what
Trainer.save_checkpoint writes: a Lightning release that changes it fails here first, not in a user's run."""

from __future__ import annotations

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

# isort: split
import lightning as L
import torch

from vdm.training.checkpoint_io import DirectCheckpointIO, checkpoint_state


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.layer.parameters(), lr=0.1)


class Counter(L.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def state_dict(self):
        return {"batches": self.batches}


def test_checkpoint_state_is_what_save_checkpoint_writes(tmp_path):
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        callbacks=[Counter()],
        plugins=[DirectCheckpointIO()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Linear(), torch.utils.data.DataLoader(torch.randn(12, 3), batch_size=4))
    state = checkpoint_state(trainer)
    trainer.save_checkpoint(tmp_path / "saved.ckpt")
    saved = torch.load(tmp_path / "saved.ckpt", weights_only=False)  # written by this test

    assert state.keys() == saved.keys()
    assert state["global_step"] == saved["global_step"] == 3
    assert state["callbacks"] == saved["callbacks"] and state["callbacks"]["Counter"] == {"batches": 3}
    assert all(torch.equal(state["state_dict"][k], v) for k, v in saved["state_dict"].items())
    assert state["optimizer_states"][0]["state"][0]["step"] == saved["optimizer_states"][0]["state"][0]["step"]
