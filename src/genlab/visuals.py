"""Pictures of a model: image grids, latent codes to decode, and the latent scatter.

Pure functions from tensors to tensors: every picture comes back as a uint8
(3, H, W) image ready for TensorBoard's ``add_image`` and for a PNG file.
`genlab.callbacks.ImageLogger` decides when to draw them and where they go.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import make_grid


def grid(images: Tensor, nrow: int) -> Tensor:
    """Images in [0, 1] of shape (N, 1, H, W) as one uint8 (3, H', W') grid, ``nrow`` per row."""
    tiles = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, pad_value=1.0)
    return tiles.mul(255).round().to(torch.uint8)


def recon_grid(originals: Tensor, reconstructions: Tensor) -> Tensor:
    """Originals in the top row, their reconstructions below."""
    return grid(torch.cat([originals, reconstructions]), nrow=len(originals))


# The margins `labelled` adds around a grid, in pixels.
TITLE_HEIGHT = 18  # above: the title
LABEL_WIDTH = 40  # left: a label per row, when given
NOTE_HEIGHT = 16  # below: a note on the axes, when given


@functools.cache
def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=12)


def labelled(
    picture: Tensor, title: str, rows: list[str] | None = None, note: str | None = None
) -> Tensor:
    """A uint8 (3, H, W) grid with its title above, a label for each of its rows on the left
    and a note on its axes below (each margin only when given), on white."""
    from PIL import Image, ImageDraw

    _, height, width = picture.shape
    left, bottom = (LABEL_WIDTH if rows else 0), (NOTE_HEIGHT if note else 0)
    canvas = Image.new("RGB", (left + width, TITLE_HEIGHT + height + bottom), "white")
    canvas.paste(Image.fromarray(picture.permute(1, 2, 0).numpy()), (left, TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    draw.text((left + 2, 3), title, fill="black", font=_font())
    for i, label in enumerate(rows or []):
        row_height = (height - 2) / len(rows)
        middle = TITLE_HEIGHT + 2 + (i + 0.5) * row_height
        draw.text((LABEL_WIDTH - 4, middle), label, fill="black", font=_font(), anchor="rm")
    if note:
        draw.text((left + 2, TITLE_HEIGHT + height + 1), note, fill="black", font=_font())
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()


def manifold_codes(size: int, extent: float) -> Tensor:
    """A ``size`` x ``size`` grid over [-extent, extent]^2 as (size^2, 2) codes, in reading order:
    z1 grows to the right, z2 grows upwards."""
    axis = torch.linspace(-extent, extent, size)
    z2, z1 = torch.meshgrid(axis.flip(0), axis, indexing="ij")
    return torch.stack([z1.flatten(), z2.flatten()], dim=1)


def traversal_codes(base: Tensor, dims: list[int], steps: int, extent: float) -> Tensor:
    """For each of ``dims``, ``steps`` copies of ``base`` whose value in that dim sweeps
    [-extent, extent]: (len(dims) * steps, latent_dim), one row of the grid per dim."""
    codes = base.expand(len(dims), steps, -1).clone()
    values = torch.linspace(-extent, extent, steps, device=base.device)
    for row, dim in enumerate(dims):
        codes[row, :, dim] = values
    return codes.flatten(0, 1)


def interpolation_codes(starts: Tensor, ends: Tensor, steps: int) -> Tensor:
    """Straight lines from each row of ``starts`` to the same row of ``ends``:
    (pairs * steps, latent_dim), one row of the grid per pair."""
    weights = torch.linspace(0, 1, steps, device=starts.device).view(1, steps, 1)
    codes = starts.unsqueeze(1) * (1 - weights) + ends.unsqueeze(1) * weights
    return codes.flatten(0, 1)


def pca_2d(codes: Tensor) -> tuple[Tensor, float]:
    """The codes projected on their first two principal axes, and the share of variance kept."""
    centred = codes - codes.mean(0)
    _, singular, v = torch.linalg.svd(centred, full_matrices=False)
    variance = singular.pow(2)
    return centred @ v[:2].T, float(variance[:2].sum() / variance.sum())


def latent_points(codes: Tensor, labels: Tensor) -> tuple[Tensor, tuple[str, str], str]:
    """What the latent scatter plots: 2-D points for ``codes`` (the codes themselves, their
    PCA when they have more dims, or one dim against the class), the axis names, and a note
    for the title ("" for plain latent dims)."""
    codes, labels = codes.detach().float().cpu(), labels.cpu().long()
    if codes.size(1) > 2:
        points, kept = pca_2d(codes)
        return points, ("PC 1", "PC 2"), f"PCA of {codes.size(1)}-D codes ({kept:.0%} of variance)"
    if codes.size(1) == 2:
        return codes, ("z1", "z2"), ""
    # One latent dim: spread the classes vertically so they stay apart.
    return torch.stack([codes[:, 0], labels.float()], dim=1), ("z1", "class"), ""


def latent_scatter(codes: Tensor, labels: Tensor, class_names: list[str], title: str) -> Tensor:
    """A scatter plot of 2-D (or, by PCA, higher-dimensional) codes coloured by class.

    The title says when the axes are principal components rather than latent dims.
    """
    import numpy as np

    labels = labels.cpu().long()
    points, axis_names, note = latent_points(codes, labels)
    if note:
        title = f"{title}\n{note}"

    figure, ax, points_image, palette = _scatter_figure(tuple(class_names))
    xy = points.numpy()
    # The axes fit these points alone, with matplotlib's usual margins, as on a new figure.
    ax.ignore_existing_data_limits = True
    ax.update_datalim(xy)
    ax.autoscale_view()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    box = ax.get_window_extent()
    colours = torch.from_numpy(palette[labels.numpy() % len(palette)])
    points_image.set_data(
        _raster(points, colours, (x0, x1, y0, y1), (round(box.height), round(box.width))).numpy()
    )
    points_image.set_extent((x0, x1, y0, y1))
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    figure.canvas.draw()
    rgba = torch.from_numpy(np.asarray(figure.canvas.buffer_rgba()).copy())
    return rgba[..., :3].permute(2, 0, 1).contiguous()


@functools.lru_cache(maxsize=4)
def _scatter_figure(class_names: tuple[str, ...]) -> tuple[Any, Any, Any, Any]:
    """The scatter's figure, axes, image of the points and class colours, built once
    per set of class names and redrawn for every picture: building the axes and
    the legend anew took a third of each picture's time."""
    # Imported here: matplotlib costs a second of start-up that runs without images never pay.
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(6.4, 5.6), dpi=100)
    FigureCanvasAgg(figure)
    # Fixed margins (room for the legend on the right): tight_layout would double the drawing time.
    figure.subplots_adjust(left=0.11, right=0.74, bottom=0.09, top=0.9)
    ax = figure.add_subplot()
    palette = np.array(colormaps["tab10"].colors, dtype=np.float32)  # ten classes, ten colours
    # The points are drawn as one image (see _raster) that fills the axes pixel for pixel.
    points_image = ax.imshow(
        np.zeros((1, 1, 4)), origin="lower", interpolation="nearest", aspect="auto"
    )
    # The image's edges must not hold the axes limits, which fit each set of points.
    ax.use_sticky_edges = False
    handles = [
        Line2D([], [], marker="o", linestyle="", color=palette[i % len(palette)], label=name)
        for i, name in enumerate(class_names)
    ]
    # Large enough to read where TensorBoard shows the picture at half its size.
    ax.legend(
        handles=handles, fontsize=11, markerscale=1.6, loc="center left", bbox_to_anchor=(1.0, 0.5)
    )
    return figure, ax, points_image, palette


# Each point is a square of this many pixels a side: at 100 dpi, about a matplotlib marker of size 2.
_POINT_PIXELS = 2


def _raster(
    points: Tensor, colours: Tensor, limits: tuple[float, ...], size: tuple[int, int]
) -> Tensor:
    """The points as an RGBA float image of ``size`` (height, width) over the data
    ``limits`` (x0, x1, y0, y1): each point a small square of its colour, later
    points (in a fixed random order, so no class covers all the others) on top,
    transparent elsewhere. Ten thousand markers drawn by matplotlib one by one
    took half of the scatter's time; this takes a few milliseconds."""
    (height, width), (x0, x1, y0, y1) = size, limits
    order = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))
    points, colours = points[order], colours[order]
    column = ((points[:, 0] - x0) / (x1 - x0) * width - _POINT_PIXELS / 2).floor().long()
    row = ((points[:, 1] - y0) / (y1 - y0) * height - _POINT_PIXELS / 2).floor().long()
    offsets = torch.arange(_POINT_PIXELS)
    rows = (row[:, None, None] + offsets[None, :, None]).expand(-1, -1, _POINT_PIXELS)
    columns = (column[:, None, None] + offsets[None, None, :]).expand(-1, _POINT_PIXELS, -1)
    drawn = torch.arange(len(points))[:, None, None].expand_as(rows)  # drawing order
    inside = (rows >= 0) & (rows < height) & (columns >= 0) & (columns < width)
    # Every pixel shows the last drawn of the points covering it.
    top = torch.full((height * width,), -1, dtype=torch.long)
    top.scatter_reduce_(0, (rows * width + columns)[inside], drawn[inside], reduce="amax")
    image = torch.zeros(height * width, 4)
    covered = top >= 0
    image[covered, :3] = colours[top[covered]]
    image[covered, 3] = 1.0
    return image.view(height, width, 4)
