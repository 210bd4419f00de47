"""genlab's Lightning callbacks: pictures of the model during training, and the
HParams table entry of a finished run."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard.summary import hparams

from genlab import private_api, visuals
from genlab.atomic import write_atomically
from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel
from genlab.options import Range, checked
from genlab.projector import write_embedding
from genlab.rundir import LATENT_POINTS_FILE

# Every picture a family may declare in its ``visuals``. manifold needs a 2-D latent
# space and traversals more than two dims; the others apply to any family declaring them.
VISUALS = ("recon", "samples", "latent", "manifold", "traversals", "interpolation")
# The fixed noise behind samples and interpolations, so that epochs show the same codes.
_NOISE_SEED = 0
_SAMPLES_PER_ROW = 8
# Held-out images over which a VAE ranks its latent dims by KL for the traversals.
_RANKING_POINTS = 1000
# Training images whose codes an AE's Gaussian is fitted to, unless callbacks.images.fit_points says.
FIT_POINTS = 10000
Count = Annotated[int, Range(1)]


def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class ImageLogger(pl.Callback):
    """Draws the pictures a model family declares (``model.visuals``) every
    ``every_n_epochs`` epochs and at the end of fit, into TensorBoard (Images
    tab, at the global step) and as PNG files ``<dirpath>/<tag>_epoch<NNN>.png``
    (NNN counts from 0, as checkpoint names do) and ``<tag>_final.png``. At the
    end of fit it also hands the codes of test images to TensorBoard's Projector (for
    more than three latent dimensions: the Projector's PCA shows nothing for fewer).

    Codes are decoded in standard units: for families with a prior (VAE, GAN)
    they are prior codes; for an AE, whose code scale is arbitrary, a unit is
    one standard deviation of a diagonal Gaussian fitted to its training codes,
    and its samples are tagged ``samples_fitted_gaussian``.
    """

    @checked("callbacks.images")
    def __init__(
        self,
        dirpath: str | Path,
        every_n_epochs: Annotated[int, Range(0, note="0: only at the end of fit")] = 1,
        num_recon: Count = 16,
        num_samples: Count = 64,
        latent_points: Count | None = None,
        manifold_size: Count = 15,
        latent_range: Annotated[float, Range(0, exclusive=True)] = 3.0,
        traversal_steps: Count = 11,
        max_traversal_dims: Count = 10,
        interpolation_pairs: Count = 8,
        interpolation_steps: Count = 10,
        fit_points: Count = FIT_POINTS,
        projector_points: Annotated[int, Range(0, note="0: no Projector data")] = 2000,
    ):
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.num_recon = num_recon
        self.num_samples = num_samples
        self.latent_points = latent_points
        self.manifold_size = manifold_size
        self.latent_range = latent_range
        self.traversal_steps = traversal_steps
        self.max_traversal_dims = max_traversal_dims
        self.interpolation_pairs = interpolation_pairs
        self.interpolation_steps = interpolation_steps
        self.fit_points = fit_points
        self.projector_points = projector_points
        self._last_drawn: tuple[int, dict[str, Tensor]] | None = None

    # -- Lightning hooks ----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and "latent" in getattr(pl_module, "visuals", ()):
            trainer.datamodule.setup("test")  # the scatter shows the test set's codes

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, GenerativeModel):
            raise GenlabError(
                f"callbacks.images draws genlab models only, not {type(pl_module).__name__}; "
                "disable it with callbacks.images=null."
            )
        unknown = set(pl_module.visuals) - set(VISUALS)
        if unknown:
            raise GenlabError(
                f"{type(pl_module).__name__}.visuals names {sorted(unknown)}, which "
                f"ImageLogger does not draw; it draws {', '.join(VISUALS)}."
            )
        self._last_drawn = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            writers = _tensorboard_writers(trainer)
            self.epoch_end(
                trainer.datamodule, pl_module, writers, trainer.current_epoch, trainer.global_step
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            writers = _tensorboard_writers(trainer)
            self.fit_end(trainer.datamodule, pl_module, writers, trainer.global_step)

    # -- what the hooks do, for a model trained by any loop (`genlab.fused` too) ----------------

    def epoch_end(
        self, datamodule: Any, model: GenerativeModel, writers: list[Any], epoch: int, step: int
    ) -> None:
        """The pictures of ``epoch`` (counted from 0), when it is one to draw."""
        n = self.every_n_epochs
        if n and (epoch + 1) % n == 0:
            images = self.draw(datamodule, model)
            self._publish(writers, images, f"epoch{epoch:03d}", step)
            self._last_drawn = (step, images)

    def fit_end(
        self, datamodule: Any, model: GenerativeModel, writers: list[Any], step: int
    ) -> None:
        """The final pictures, the latent scatter's points and the Projector's codes."""
        if self._last_drawn is not None and self._last_drawn[0] == step:
            images = self._last_drawn[1]  # the last epoch's pictures already show the final weights
            self._write_pngs(images, "final")
        else:
            images = self.draw(datamodule, model)
            self._publish(writers, images, "final", step)
        if "latent" in images:
            self._save_latent_points()
        if self.projector_points and "latent" in model.visuals:
            self._add_embedding(datamodule, model, writers, step)

    # -- drawing --------------------------------------------------------------------------------

    def draw(self, datamodule: Any, model: GenerativeModel) -> dict[str, Tensor]:
        """Every picture ``model`` declares that fits its latent size, by TensorBoard tag."""
        with _evaluating(model):
            return self._draw(datamodule, model)

    def _draw(self, datamodule: Any, model: GenerativeModel) -> dict[str, Tensor]:
        splits = datamodule.splits
        latent_dim = model.hparams.latent_dim
        declared = set(model.visuals)
        held_out = _held_out_images(splits)
        fit_images = splits["train"][0][: self.fit_points] if model.fitted_prior else None
        gaussian = model.code_gaussian(fit_images)
        noise = torch.Generator().manual_seed(_NOISE_SEED)  # the same codes at every epoch

        def decode(units: Tensor) -> Tensor:  # codes given in standard units of the Gaussian
            mean, std = gaussian
            return model.decode(mean + std * units.to(model.device))

        images: dict[str, Tensor] = {}
        if "recon" in declared:
            originals = held_out[: self.num_recon]
            recon = visuals.recon_grid(originals, model.decode(model.embed(originals)))
            images["recon"] = visuals.labelled(
                recon, "Reconstructions of held-out images", rows=["input", "recon"]
            )
        # Drawn whether or not it is shown, so that the interpolations' codes stay the same.
        samples = model.sample(self.num_samples, noise, gaussian)
        if "samples" in declared:
            tag = "samples_fitted_gaussian" if model.fitted_prior else "samples"
            title = "Samples, fitted Gaussian" if model.fitted_prior else "Prior samples"
            images[tag] = visuals.labelled(visuals.grid(samples, _SAMPLES_PER_ROW), title)
        if "latent" in declared:
            test_images, labels = splits["test"]
            end = self.latent_points
            codes = model.embed_all(test_images[:end])
            images["latent"] = visuals.latent_scatter(
                codes,
                labels[:end],
                datamodule.class_names,
                f"{type(model).__name__} codes of {len(labels[:end])} test images",
            )
            self._latent_codes = (codes, labels[:end], datamodule.class_names)
        if "manifold" in declared and latent_dim == 2:
            codes = visuals.manifold_codes(self.manifold_size, self.latent_range)
            extent = f"{self.latent_range:g}"
            images["manifold"] = visuals.labelled(
                visuals.grid(decode(codes), self.manifold_size),
                f"Decoded grid, z1 and z2 from -{extent} to {extent}",
                note="z1 grows to the right, z2 upwards",
            )
        if "traversals" in declared and latent_dim > 2:
            ranked = model.rank_latent_dims(held_out[:_RANKING_POINTS])
            dims = ranked[: self.max_traversal_dims].tolist()
            codes = visuals.traversal_codes(
                torch.zeros(latent_dim), dims, self.traversal_steps, self.latent_range
            )
            extent = f"{self.latent_range:g}"
            images["traversals"] = visuals.labelled(
                visuals.grid(decode(codes), self.traversal_steps),
                f"Each row: one dim from -{extent} to {extent}",
                rows=[f"z{d}" for d in dims],
            )
        if "interpolation" in declared:
            ends = torch.randn(2 * self.interpolation_pairs, latent_dim, generator=noise)
            starts, ends = ends.chunk(2)
            codes = visuals.interpolation_codes(starts, ends, self.interpolation_steps)
            images["interpolation"] = visuals.labelled(
                visuals.grid(decode(codes), self.interpolation_steps),
                "Lines between random codes",
            )
        return images

    # -- writing ----------------------------------------------------------------------------------

    def _publish(
        self, writers: list[Any], images: dict[str, Tensor], suffix: str, step: int
    ) -> None:
        for tag, png in self._write_pngs(images, suffix).items():
            # The PNG just written goes to TensorBoard as it is: add_image would encode it again.
            _, height, width = images[tag].shape
            encoded = Summary.Image(
                height=height, width=width, colorspace=3, encoded_image_string=png
            )
            summary = Summary(value=[Summary.Value(tag=tag, image=encoded)])
            for writer in writers:
                private_api.event_file_writer(writer).add_summary(summary, step)

    def _write_pngs(self, images: dict[str, Tensor], suffix: str) -> dict[str, bytes]:
        """Write ``<tag>_<suffix>.png`` for every image; returns the encoded files by tag."""
        self.dirpath.mkdir(parents=True, exist_ok=True)
        encoded = {}
        for tag, image in images.items():
            encoded[tag] = _png(image)
            (self.dirpath / f"{tag}_{suffix}.png").write_bytes(encoded[tag])
        return encoded

    def _save_latent_points(self) -> None:
        """The final latent scatter's points as data (``LATENT_POINTS_FILE``): a sweep report
        draws every job's on one scale."""
        import numpy as np

        codes, labels, class_names = self._latent_codes
        labels = labels.cpu()  # on the GPU when training there
        points, axes, note = visuals.latent_points(codes, labels)
        # Atomically: a run killed mid-write must not leave a file the report cannot read.
        write_atomically(
            self.dirpath / LATENT_POINTS_FILE,
            lambda f: np.savez(
                f,
                points=points.numpy(),
                labels=labels.numpy(),
                axes=np.array(axes),
                note=np.array(note),
                class_names=np.array(class_names),
            ),
        )

    def _add_embedding(
        self, datamodule: Any, model: GenerativeModel, writers: list[Any], step: int
    ) -> None:
        """Test-set codes for TensorBoard's Projector, labelled by class name, with the images."""
        if not writers:
            return
        images, labels = datamodule.splits["test"]
        # Its image sprite takes seconds to write for the whole test set, hence a subset.
        images, labels = images[: self.projector_points], labels[: self.projector_points]
        with _evaluating(model):
            codes = model.embed_all(images).cpu()
        if codes.shape[1] <= 3:  # the Projector's PCA needs more; the latent scatter shows these
            return
        names = datamodule.class_names
        for writer in writers:
            write_embedding(
                Path(writer.log_dir),
                codes,
                [names[i] for i in labels.tolist()],
                images,
                step,
                tag="latent",
            )


@contextlib.contextmanager
def _evaluating(model: GenerativeModel) -> Iterator[None]:
    """Eval mode and no gradients for a while, then back to how the model was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _held_out_images(splits: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """Validation images, or test images when a run has no validation split; the same every epoch."""
    images = splits["val"][0]
    return images if len(images) else splits["test"][0]


def _png(image: Tensor) -> bytes:
    """A uint8 (3, H, W) image as PNG file contents."""
    buffer = io.BytesIO()
    # Level 1: these flat grids barely shrink further, and level 6 takes twice as long.
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class HParamsLogger(pl.Callback):
    """Puts a run in TensorBoard's HParams table: its main hyperparameters beside
    the test metrics it ends with, so the runs of a sweep compare in one view."""

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_config = getattr(pl_module, "run_config", None)
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("test/")
        }
        if run_config and trainer.is_global_zero:
            write_hparams(_tensorboard_writers(trainer), run_config, metrics, trainer.global_step)


def write_hparams(
    writers: list[Any], run_config: dict[str, Any], metrics: dict[str, float], step: int
) -> None:
    """A run's HParams table entry: its `table_hparams` beside its test metrics."""
    if not (writers and metrics):
        return
    # The metric values are the test/ scalars the test pass has just logged: the
    # table refers to them by tag, so nothing is written twice. Only the session is
    # written, not an experiment summary of this run's own: TensorBoard then derives
    # the table from every run it shows, putting the options that differ between
    # them (what a sweep varied) first, among the few columns it ticks by default.
    _experiment, *session = hparams(table_hparams(run_config), metrics)
    for writer in writers:
        file_writer = private_api.event_file_writer(writer)
        for summary in session:
            file_writer.add_summary(summary, step)
        writer.flush()


def table_hparams(run_config: dict[str, Any]) -> dict[str, Any]:
    """The options that tell runs apart, as HParams columns (numbers and strings only)."""
    model, data = run_config["model"], run_config["data"]
    net = model.get("net", {})
    columns = {
        "model": model["_target_"].rsplit(".", 1)[-1],
        "net": f"{net.get('_target_', '').rsplit('.', 1)[-1]} {net.get('hidden_dims')}",
        "activation": net.get("activation"),
        "latent_dim": model.get("latent_dim"),
        "beta": model.get("beta"),
        "recon_loss": model.get("recon_loss"),
        "iw_samples": model.get("iw_samples"),
        "lr": model.get("optimizer", {}).get("lr"),
        "data": data.get("dataset"),
        "binarize": data.get("binarize"),
        "batch_size": data.get("batch_size"),
        "max_epochs": run_config.get("trainer", {}).get("max_epochs"),
        "seed": run_config.get("seed"),
    }
    return {name: value for name, value in columns.items() if value is not None}
