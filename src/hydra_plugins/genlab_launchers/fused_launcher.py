"""``hydra/launcher=fused``: the jobs of a sweep that can share one program train together,
as one stacked model in this process (see `genlab.fused`); the others run one by one, as
Hydra's basic launcher runs them.

Hydra imports every plugin module whenever it starts, so this one imports no torch: the
work is in `genlab.fused.launch`, imported when a sweep launches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class FusedLauncher(Launcher):
    """Trains the fusable jobs of a sweep in groups of at most ``max_members``."""

    def __init__(self, max_members: int = 16) -> None:
        super().__init__()
        if isinstance(max_members, bool) or not isinstance(max_members, int) or max_members < 1:
            from genlab.errors import GenlabError

            raise GenlabError(
                f"hydra.launcher.max_members={max_members!r} must be a whole number of at least "
                f"1: how many jobs at most train as one model (default 16)."
            )
        self.max_members = max_members
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from genlab.fused.launch import launch_jobs

        return launch_jobs(self, job_overrides, initial_job_idx)


__all__: list[Any] = ["FusedLauncher"]
