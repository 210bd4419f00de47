"""OmegaConf resolvers that genlab's configs use; registered when `genlab.config` is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def eval_dir(ckpt_path: Any, log_dir: Any) -> str:
    """Where genlab-eval writes by default: ``<run dir>/eval`` beside the run whose
    checkpoint it evaluates (``<run dir>/checkpoints/<file>.ckpt``), the checkpoint's own
    folder's ``eval`` for a checkpoint elsewhere, and ``<log_dir>/eval`` without one."""
    if not ckpt_path:
        return f"{log_dir}/eval"
    folder = Path(str(ckpt_path)).parent
    run_dir = folder.parent if folder.name == "checkpoints" else folder
    return str(run_dir / "eval")


OmegaConf.register_new_resolver("genlab.eval_dir", eval_dir, replace=True)
