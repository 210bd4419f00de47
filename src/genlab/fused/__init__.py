"""Fused sweeps (``hydra/launcher=fused``): the jobs of a sweep that differ only in latent
size, KL weight, warm-up and seed train together as one stacked model in one process,
each job still a complete run of its own.

`stack` pads and stacks the members' parameters, `model` trains them as one
LightningModule, `group` writes each member's run folder, and `launch` decides which
jobs fuse.
"""
