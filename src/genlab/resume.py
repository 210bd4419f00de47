"""Continuing a run exactly: which checkpoint ``resume`` names (and whether it belongs to
this experiment), random streams that restart from (seed, epoch) and travel in every
checkpoint, and one log history across the attempts of a run."""

from __future__ import annotations

import csv
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning import loggers as pl_loggers
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from genlab import private_api
from genlab.checkpoints import read_checkpoint
from genlab.config.compare import config_changes
from genlab.errors import FolderTaken, GenlabError
from genlab.models.base import CONFIG_KEY
from genlab.rundir import LAST_CHECKPOINT, METRICS_FILE

# Options that may differ when a run is continued: where things live, how long
# and on what it trains. Any other change means the checkpoint belongs to
# another experiment (the optimiser state in it would even override a new lr).
_FREE_ON_RESUME = (
    "resume",
    "paths.",
    "trainer.",
    "callbacks.",
    "logger.",
    "eval.",
    "data.data_dir",
    "data.download",
    "data.eval_batch_size",
)


def resume_checkpoint(
    resume: str | None, checkpoint_dir: Path, run_config: dict[str, Any], output_dir: Path
) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint that ``resume`` (null | last | a path) asks to continue from: its
    path and contents (read as data), or None for a fresh run.

    A fresh run (``resume=null``) refuses a directory that already holds checkpoints
    or the metrics.json of an earlier run, so earlier work is never overwritten by
    accident; a resumed run must describe the same experiment as the checkpoint.
    """
    if resume is None:
        earlier = sorted(p.name for p in checkpoint_dir.glob("*.ckpt"))
        if (output_dir / METRICS_FILE).exists():
            earlier.append(METRICS_FILE)
        if earlier:
            raise FolderTaken(
                f"{str(output_dir)!r} already holds the results of an earlier run "
                f"({', '.join(earlier)}). Continue that run with resume=last, or start a new one "
                f"in another directory (leave hydra.run.dir at its default or choose a new one)."
            )
        return None
    if resume == "last":
        path = checkpoint_dir / LAST_CHECKPOINT
        if not path.is_file():
            raise GenlabError(
                f"resume=last found no checkpoint at {str(path)!r}. Pass the run's directory with "
                f"hydra.run.dir=<run dir> (and the run's overrides), or resume=<path to a .ckpt>."
            )
    else:
        path = Path(resume)
        if not path.is_file():
            raise GenlabError(
                f"resume={resume!r} is not a checkpoint file. Use resume=null (a fresh run), "
                f"resume=last (this run directory's {LAST_CHECKPOINT}) or a path to a .ckpt file."
            )
    checkpoint = read_checkpoint(path, f"resume={resume}")
    saved = checkpoint.get(CONFIG_KEY)
    if saved is not None and not isinstance(saved, dict):
        raise GenlabError(
            f"resume={resume}: {str(path)!r} is not a checkpoint genlab-train wrote (its run "
            f"config is a {type(saved).__name__}, not a mapping)."
        )
    changes = config_changes(saved, run_config, _FREE_ON_RESUME) if saved is not None else []
    if changes:
        raise GenlabError(
            f"resume={resume} would continue {str(path)!r} as a different experiment: "
            f"{'; '.join(changes)}. Repeat the run's own overrides (its .hydra/overrides.yaml) "
            f"when resuming; only paths, trainer, callbacks and logger settings may change."
        )
    return str(path), checkpoint


# -- random streams -----------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for the training noise of one epoch, independent of the data order's."""
    return int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    """The global random states, in types a ``weights_only`` checkpoint load accepts."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SeedEachEpoch(pl.Callback):
    """Seeds Python, NumPy and torch from (seed, epoch) when a training epoch starts.

    The training noise of an epoch (VAE reparameterisation, GAN latents) then
    depends only on the seed and the epoch, not on what else drew random
    numbers before, so a run resumed at an epoch boundary repeats an
    uninterrupted one exactly. The states also travel in every checkpoint, for
    runs resumed mid-epoch.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every CUDA device too

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_state(state_dict)


# -- one log history ------------------------------------------------------------------------------


class CSVLogger(pl_loggers.CSVLogger):
    """Lightning's CSV logger, continuing ``metrics.csv`` when a run is resumed (Lightning's
    own deletes the file whenever its folder is reused, losing the earlier epochs)."""

    _continued: Any = None  # Lightning's writer, once it holds the earlier attempts' rows

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._continued is None:
            keys, rows = _read_csv(Path(self.log_dir) / "metrics.csv")
            with warnings.catch_warnings():  # "previous log files ... will be deleted": not here
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                writer = super().experiment
            # The earlier rows go back into the writer, which writes them again at its next save.
            writer.metrics_keys, writer.metrics = keys, rows + writer.metrics
            self._continued = writer
        return self._continued

    def drop_from(self, step: int) -> None:
        """Forget the rows logged at ``step`` or later, saved or not."""
        writer = self.experiment
        path = Path(writer.metrics_file_path)
        writer.metrics = [row for row in writer.metrics if int(row["step"]) < step]
        keys, rows = _read_csv(path)
        if rows:
            with path.open("w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=keys)
                out.writeheader()
                out.writerows(row for row in rows if int(row["step"]) < step)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


class OneLogHistory(pl.Callback):
    """Keeps one log history across a resume.

    An attempt that crashed after its last checkpoint has logged steps the
    resumed run will log again. At the resumed run's first batch this writes
    TensorBoard's restart marker (what ``SummaryWriter(purge_step=...)``
    writes), which makes TensorBoard drop the earlier events from that step on,
    and drops those rows from the CSV log of `CSVLogger`.
    """

    def __init__(self) -> None:
        self._pending = True

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._pending:
            return
        self._pending = False
        if trainer.ckpt_path is None:
            return
        mark_restart(trainer.loggers, private_api.logged_step(trainer))


def mark_restart(loggers: list[Any], step: int) -> None:
    """Make ``loggers`` forget what an earlier attempt logged at ``step`` or later."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            restart = Event(step=step, session_log=SessionLog(status=SessionLog.START))
            logger.experiment.file_writer.add_event(restart)
        elif isinstance(logger, CSVLogger):
            logger.drop_from(step)
