"""Each private part of Lightning, Hydra, TensorBoard and torch that genlab relies on
(`genlab.private_api`) still is what genlab expects, in the installed versions."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from genlab import private_api


class _Tiny(pl.LightningModule):
    """Records what the private API says at every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.seen: list[tuple[bool, int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(
            (private_api.writes_step_logs(self.trainer), private_api.logged_step(self.trainer))
        )
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_one_epoch(model: pl.LightningModule, tmp_path, **trainer_args) -> pl.Trainer:
    """A bare Trainer's epoch of six one-example batches."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(6, 2)))
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_args,
    )
    trainer.fit(model, data)
    return trainer


def test_lightnings_logging_step_and_hook_name_are_where_genlab_reads_them(tmp_path):
    model = _Tiny()
    _fit_one_epoch(model, tmp_path, log_every_n_steps=2, logger=pl.loggers.CSVLogger(tmp_path))
    # Written out every second step; the step the loggers record counts batches that stepped.
    assert model.seen == [(False, 0), (True, 1), (False, 2), (True, 3), (False, 4), (True, 5)]
    assert hasattr(model, private_api.HOOK_NAME_ATTRIBUTE)


def test_a_compiled_module_is_told_apart():
    module = nn.Linear(2, 2)
    assert not private_api.is_compiled(module)
    module.compile()
    assert private_api.is_compiled(module)


def test_the_event_file_of_a_summary_writer_opens_again_after_close(tmp_path):
    writer = SummaryWriter(tmp_path)
    writer.close()
    assert hasattr(private_api.event_file_writer(writer), "add_summary")
    writer.close()


def test_hydras_reporter_is_rerouted_for_the_block_only():
    from hydra._internal import utils as hydra_utils

    original = hydra_utils.run_and_report
    seen = []

    def rewrite(work):
        seen.append("rewritten")
        return work()

    with private_api.hydra_errors_rewritten(rewrite):
        assert hydra_utils.run_and_report(lambda: 7) == 7
    assert seen == ["rewritten"]
    assert hydra_utils.run_and_report is original


class _StopsAtStep2(_Tiny):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            assert private_api.request_sigterm_stop(self.trainer)
        return super().training_step(batch, batch_idx)


def test_a_stop_asked_of_lightnings_signal_connector_ends_fit_after_the_batch(tmp_path):
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    model = _StopsAtStep2()
    with pytest.raises(SIGTERMException):
        _fit_one_epoch(model, tmp_path, logger=False)
    assert model.trainer.global_step == 3  # the batch that asked finished
