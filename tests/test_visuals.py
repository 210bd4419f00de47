"""Pictures of a run: what TensorBoard and <run dir>/images/ hold, read back from the files."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from genlab import callbacks, visuals
from genlab.data import CLASS_NAMES, ImageDataModule
from genlab.errors import GenlabError
from genlab.train import train

TILE = 28 + 2  # make_grid pads every image by 2 pixels


def grid_size(
    rows: int, cols: int, row_labels: bool = False, note: bool = False
) -> tuple[int, int]:
    """(height, width) of a labelled grid of rows x cols images: a make_grid picture with
    its title above, and its row labels left of it and its note below when it has them."""
    height = rows * TILE + 2 + visuals.TITLE_HEIGHT + (visuals.NOTE_HEIGHT if note else 0)
    return height, cols * TILE + 2 + (visuals.LABEL_WIDTH if row_labels else 0)


def read_events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events


def image_sizes(events: EventAccumulator) -> dict[str, tuple[int, int]]:
    """(height, width) of the last picture under each image tag."""
    return {
        tag: (events.Images(tag)[-1].height, events.Images(tag)[-1].width)
        for tag in events.Tags()["images"]
    }


def test_a_2d_vae_run_logs_curves_and_its_pictures(make_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # The limits of genlab-train's documented example: two short epochs.
    train(
        make_cfg(
            "model=vae",
            "model.latent_dim=2",
            "trainer.max_epochs=2",
            "++trainer.limit_train_batches=40",
            "++trainer.limit_val_batches=10",
            "++trainer.limit_test_batches=10",
            "trainer.log_every_n_steps=10",
        )
    )
    run_dir = tmp_path / "run"
    # The final scatter's points are saved as plain arrays, for the sweep report.
    with np.load(run_dir / "images" / "latent_final.npz", allow_pickle=False) as saved:
        assert saved["points"].shape == (len(saved["labels"]), 2)
        assert list(saved["axes"]) == ["z1", "z2"] and len(saved["class_names"]) == 10
    events = read_events(run_dir)
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_step", "val/loss", "test/neg_elbo"} <= scalars
    assert "epoch" not in scalars  # Lightning's staircase would open the Scalars tab
    # The console log (train.log) has a line per epoch with its numbers.
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "TPU available" in m or "GPU available: False" in m]
    lines = [m for m in said if m.startswith("Epoch ")]
    assert [line.split(":")[0] for line in lines] == ["Epoch 0 (1 of 2)", "Epoch 1 (2 of 2)"]
    for tag in ("train/loss", "val/loss"):
        assert f"{tag} {events.Scalars(tag)[-1].value:.4g}" in lines[-1]
    # One mean per epoch; per-step values every log_every_n_steps.
    assert [e.step for e in events.Scalars("train/loss")] == [39, 79]
    assert len(events.Scalars("train/loss_step")) == 8

    sizes = image_sizes(events)
    assert sizes.keys() == {"recon", "samples", "latent", "manifold", "interpolation"}
    assert sizes["recon"] == grid_size(2, 16, row_labels=True)
    assert sizes["samples"] == grid_size(8, 8)
    assert sizes["manifold"] == grid_size(15, 15, note=True)
    assert sizes["interpolation"] == grid_size(8, 10)
    assert sizes["latent"] == (560, 640)
    # Drawn after each epoch, at its last step; the final pictures are the last epoch's.
    assert [e.step for e in events.Images("manifold")] == [40, 80]

    pngs = {p.name for p in (run_dir / "images").glob("*.png")}
    for tag in sizes:
        assert {f"{tag}_epoch000.png", f"{tag}_epoch001.png", f"{tag}_final.png"} <= pngs

    # HParams tab: the run's options beside the test metrics trainer.test logged.
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["model"].string_value == "VAE"
    assert hparams["latent_dim"].number_value == 2 and hparams["beta"].number_value == 1
    assert hparams["data"].string_value == "mnist" and hparams["seed"].number_value == 42
    # No experiment summary of its own: TensorBoard then derives the table from all the
    # runs it shows, the options that differ between them (a sweep's) first.
    assert "_hparams_/experiment" not in content

    # No Projector for two dimensions: its PCA would show an empty plot.
    assert not (run_dir / "tensorboard" / "projector_config.pbtxt").exists()


def test_a_larger_latent_space_gets_traversals_instead_of_a_manifold(make_cfg, tmp_path):
    train(make_cfg("model=vae", "model.latent_dim=8"))
    sizes = image_sizes(read_events(tmp_path / "run"))
    assert "manifold" not in sizes
    # Every one of the 8 dims, 11 steps each, a row labelled by its dim.
    assert sizes["traversals"] == grid_size(8, 11, row_labels=True)

    # Projector: the test codes of the final weights, labelled by class name.
    (metadata,) = (tmp_path / "run" / "tensorboard").glob("*/latent/metadata.tsv")
    assert set(metadata.read_text().split()) <= set(CLASS_NAMES["mnist"])
    codes = np.loadtxt(metadata.parent / "tensors.tsv")
    assert codes.shape == (100, 8)  # callbacks.images.projector_points of the tests
    assert (metadata.parent / "sprite.png").is_file()


def test_a_gan_shows_samples_and_interpolations_only(make_cfg, tmp_path):
    train(make_cfg("model=gan"))
    sizes = image_sizes(read_events(tmp_path / "run"))
    assert sizes == {"samples": grid_size(8, 8), "interpolation": grid_size(8, 10)}


def test_an_ae_on_fashion_mnist_names_its_classes_and_says_where_samples_come_from(
    make_cfg, tmp_path, monkeypatch
):
    legends = []

    def recording_scatter(codes, labels, class_names, title):
        legends.append(class_names)
        return real_scatter(codes, labels, class_names, title)

    real_scatter = visuals.latent_scatter
    monkeypatch.setattr(visuals, "latent_scatter", recording_scatter)
    train(make_cfg("model=ae", "data=fashion_mnist", "model.latent_dim=4"))

    assert legends and all(names == CLASS_NAMES["fashion_mnist"] for names in legends)
    assert "Ankle boot" in legends[0]
    sizes = image_sizes(read_events(tmp_path / "run"))
    assert {"recon", "samples_fitted_gaussian", "latent", "traversals"} == sizes.keys()


def test_every_n_epochs_0_draws_only_the_final_pictures(make_cfg, tmp_path):
    train(make_cfg("model=gan", "callbacks.images.every_n_epochs=0", "logger=csv"))
    pngs = sorted(p.name for p in (tmp_path / "run" / "images").glob("*.png"))
    assert pngs == ["interpolation_final.png", "samples_final.png"]


def test_the_manifold_reads_like_a_map_of_the_latent_plane(make_cfg, data_dir):
    cfg = make_cfg("model=vae", "model.latent_dim=2", "callbacks.images.manifold_size=3")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    logger = instantiate(cfg.callbacks.images)
    images = logger.draw(datamodule, model)

    # Top-left tile: z1 = -3 (left), z2 = +3 (top); bottom-right: (+3, -3).
    corners = torch.tensor([[-3.0, 3.0], [3.0, -3.0]])
    expected = model.decode(corners).detach().mul(255).round()
    manifold = images["manifold"].float()[:, visuals.TITLE_HEIGHT :]  # below its title
    top_left = manifold[0, 2 : 2 + 28, 2 : 2 + 28]
    bottom_right = manifold[0, 2 + 2 * TILE : 2 * TILE + 30, 2 + 2 * TILE : 2 * TILE + 30]
    # Within one grey level: a batch of 9 codes and one of 2 may round differently.
    assert (top_left - expected[0, 0]).abs().max() <= 1
    assert (bottom_right - expected[1, 0]).abs().max() <= 1
    assert (top_left - bottom_right).abs().max() > 1  # the corners are different pictures


def test_codes_for_traversals_and_interpolations():
    base = torch.tensor([0.5, -0.5, 0.0])
    codes = visuals.traversal_codes(base, dims=[2, 0], steps=3, extent=3.0).view(2, 3, 3)
    assert codes[0, :, 2].tolist() == [-3.0, 0.0, 3.0]  # row 0 sweeps dim 2
    assert torch.equal(codes[0, :, :2], base[:2].expand(3, 2))  # and leaves the others
    assert codes[1, :, 0].tolist() == [-3.0, 0.0, 3.0]

    starts, ends = torch.zeros(2, 4), torch.ones(2, 4)
    line = visuals.interpolation_codes(starts, ends, steps=5).view(2, 5, 4)
    assert torch.equal(line[:, 0], starts) and torch.equal(line[:, -1], ends)
    assert line[0, 2].tolist() == [0.5] * 4


def test_pca_keeps_the_directions_of_largest_variance():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(2000, 5, generator=generator) * torch.tensor([5.0, 0.1, 3.0, 0.1, 0.1])
    points, kept = visuals.pca_2d(codes)
    assert points.shape == (2000, 2)
    assert kept == pytest.approx(34 / 34.03, abs=0.01)
    assert points[:, 0].std() == pytest.approx(5.0, rel=0.1)


BLUE, RED = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)  # tab10's colours of classes 0 and 3


def _pixels_of(image: torch.Tensor, rgb: tuple[int, int, int]) -> torch.Tensor:
    """(row, column) of every pixel of colour ``rgb`` left of the scatter's legend, whose
    markers have the classes' colours too (the axes end at 78% of the width)."""
    plot = image[:, :, : int(0.78 * image.size(2))]
    return (plot == torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)).all(0).nonzero().float()


def test_the_scatter_colours_each_class():
    codes = torch.tensor([[0.0, 0.0], [10.0, 10.0]]).repeat_interleave(200, 0)
    codes = codes + 0.1 * torch.randn_like(codes)
    labels = torch.tensor([0, 3]).repeat_interleave(200)
    image = visuals.latent_scatter(codes, labels, CLASS_NAMES["mnist"], "test")
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert len(_pixels_of(image, BLUE)) > 200 and len(_pixels_of(image, RED)) > 200


def test_the_scatter_puts_points_where_its_axes_say():
    generator = torch.Generator().manual_seed(0)
    codes = torch.tensor([[0.0, 0.0], [10.0, 10.0]]).repeat_interleave(200, 0)
    codes = codes + 0.1 * torch.randn(codes.shape, generator=generator)
    labels = torch.tensor([0, 3]).repeat_interleave(200)
    image = visuals.latent_scatter(codes, labels, CLASS_NAMES["mnist"], "test")
    (blue_row, blue_col), (red_row, red_col) = (_pixels_of(image, c).mean(0) for c in (BLUE, RED))
    # Class 3 sits at larger z1 (right) and larger z2 (up: smaller image rows).
    assert red_col > blue_col + 200 and red_row < blue_row - 200


def test_each_scatter_fits_its_own_points():
    labels = torch.zeros(1000, dtype=torch.long)
    wide = torch.rand(1000, 2) * 100
    visuals.latent_scatter(wide, labels, CLASS_NAMES["mnist"], "wide")
    narrow = visuals.latent_scatter(wide / 100, labels, CLASS_NAMES["mnist"], "narrow")
    columns, rows = _pixels_of(narrow, BLUE)[:, 1], _pixels_of(narrow, BLUE)[:, 0]
    # The axes span about 440 x 450 pixels: the narrow points fill them, not a corner of them.
    assert columns.max() - columns.min() > 350 and rows.max() - rows.min() > 350


def test_a_vae_ranks_its_latent_dims_by_kl(make_cfg):
    model = instantiate(make_cfg("model=vae", "model.latent_dim=3").model)
    mu = torch.tensor([[0.0, 2.0, 0.5]]).expand(10, 3)
    model.encode = lambda x: (mu, torch.zeros_like(mu))
    assert model.rank_latent_dims(torch.zeros(10, 1, 28, 28)).tolist() == [1, 2, 0]


def test_data_sets_name_their_classes():
    assert ImageDataModule("mnist").class_names == [str(d) for d in range(10)]
    assert ImageDataModule("fashion_mnist").class_names[9] == "Ankle boot"


@pytest.mark.parametrize(
    ("option", "value"),
    [("num_samples", 0), ("manifold_size", 0), ("every_n_epochs", -1), ("latent_range", 0.0)],
)
def test_bad_image_options_are_clear_errors(tmp_path, option, value):
    with pytest.raises(GenlabError, match=f"callbacks.images.{option}={value} must be"):
        callbacks.ImageLogger(tmp_path, **{option: value})


def test_every_family_declares_only_pictures_the_logger_draws():
    from genlab.models import AE, GAN, VAE

    for family in (AE, GAN, VAE):
        assert family.visuals and set(family.visuals) <= set(callbacks.VISUALS)


def test_the_projector_sprite_lays_images_out_row_by_row_and_is_drawn_once():
    from PIL import Image as PILImage

    from genlab import projector

    images = torch.rand(10, 1, 28, 28)
    png = projector.sprite(images)
    assert projector.sprite(images.clone()) is png  # the next job of a sweep reuses it
    grid = np.asarray(PILImage.open(io.BytesIO(png)))
    assert grid.shape == (4 * 28, 4 * 28)  # ceil(sqrt(10)) images a side
    expected = (images[6, 0] * 255).round().byte().numpy()  # row 1, column 2
    assert np.array_equal(grid[28:56, 56:84], expected)
    assert not grid[84:].any()  # the square's unused cells stay black


def test_a_labelled_picture_keeps_its_grid_and_writes_its_labels_on_white():
    picture = torch.zeros(3, 62, 92, dtype=torch.uint8)  # a black 2 x 3 grid
    out = visuals.labelled(picture, "Title", rows=["a", "b"], note="z1 grows to the right")
    top, left = visuals.TITLE_HEIGHT, visuals.LABEL_WIDTH
    assert out.shape == (3, top + 62 + visuals.NOTE_HEIGHT, left + 92)
    assert torch.equal(out[:, top : top + 62, left:], picture)  # the grid, untouched
    for margin in (out[:, :top], out[:, top : top + 62, :left], out[:, top + 62 :]):
        assert (margin < 128).any() and (margin == 255).float().mean() > 0.5  # text on white
