"""Everything Lightning: the LightningModule, data module, callbacks, checkpoints and run directory."""
