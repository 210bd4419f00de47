"""genlab-train with one of genlab's speed-ups switched off, for ``benchmark.py --speedups``.

    python scripts/without_speedup.py NAME [genlab-train overrides ...]

NAME is one of `SPEEDUPS`; ``none`` switches nothing off. Each speed-up is replaced by
what Lightning (or tensorboard) does without it, so the two runs differ in that alone.
"""

from __future__ import annotations

import sys


def _plain_lightning_methods(*names: str) -> None:
    from genlab.models.lean import LeanLightningModule

    for name in names:
        delattr(LeanLightningModule, name)  # Lightning's own method takes over


def _log_every_step() -> None:
    from genlab import private_api

    private_api.writes_step_logs = lambda trainer: True


def _lightning_logging() -> None:
    """Training metrics through Lightning's self.log at every step (on_step and on_epoch),
    with the divergence check on the device: no Python floats, sums or gate."""
    import torch

    from genlab.errors import TrainingDiverged
    from genlab.models.lean import LeanLightningModule

    original = LeanLightningModule.log_metrics

    def log_metrics(self, split, metrics, batch_size):
        if split != "train":
            return original(self, split, metrics, batch_size)
        if not bool(torch.isfinite(torch.stack(list(metrics.values()))).all()):
            raise TrainingDiverged("Training diverged.")
        self._log("train", metrics, on_step=True, batch_size=batch_size)
        self._log("train", metrics, batch_size=batch_size)

    LeanLightningModule.log_metrics = log_metrics


def _default_profiler() -> None:
    from pytorch_lightning.profilers import PassThroughProfiler

    from genlab import runtime

    runtime.QuietProfiler = PassThroughProfiler


def _uncached_cuda_check() -> None:
    from genlab import runtime

    runtime.cache_cuda_check = lambda trainer: None


def _python_checksums() -> None:
    from genlab import runtime

    runtime.fast_tensorboard_checksums = lambda: False


# What each speed-up is, and how to switch it off.
SPEEDUPS = {
    "none": ("nothing switched off", lambda: None),
    "hook_name": (
        "`__setattr__` of Lightning's hook name",
        lambda: _plain_lightning_methods("__setattr__"),
    ),
    "transfer": (
        "`transfer_batch_to_device` skipped for batches on the device",
        lambda: _plain_lightning_methods("transfer_batch_to_device"),
    ),
    "clipping": (
        "`configure_gradient_clipping` skipped when unset",
        lambda: _plain_lightning_methods("configure_gradient_clipping"),
    ),
    "log_gate": ("per-step values handed to Lightning on logging steps only", _log_every_step),
    "metric_sums": (
        "training metrics read once and summed in Python (instead of self.log every step)",
        _lightning_logging,
    ),
    "profiler": ("`QuietProfiler` instead of Lightning's PassThroughProfiler", _default_profiler),
    "cuda_check": ("`cache_cuda_check`", _uncached_cuda_check),
    "checksums": ("TensorBoard's record checksums in C", _python_checksums),
}


def main() -> None:
    name, overrides = sys.argv[1], sys.argv[2:]
    SPEEDUPS[name][1]()
    from genlab.cli import train_command

    sys.argv = ["genlab-train", *overrides]
    train_command()


if __name__ == "__main__":
    main()
