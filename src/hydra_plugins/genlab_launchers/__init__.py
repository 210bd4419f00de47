"""genlab's Hydra launchers (``hydra/launcher=fused``)."""
