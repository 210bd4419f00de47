"""TensorBoard Projector files for a run: codes, class names, and a sprite of the images.

The layout is TensorBoard's (``<logdir>/<step>/<tag>/tensors.tsv``, ``metadata.tsv``,
``sprite.png``, listed in ``<logdir>/projector_config.pbtxt``, written whole or not at
all), with TensorBoard's projector config message. The sprite, the same for every job of a sweep on
one data set, is drawn once per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins import projector
from torch import Tensor

from genlab.atomic import write_atomically

_SPRITES: dict[str, bytes] = {}  # PNG bytes by hash of the images they show
_SPRITES_KEPT = 4


def sprite(images: Tensor) -> bytes:
    """The images (N, C, H, W in [0, 1]) as one square PNG grid, row by row (the Projector's
    sprite layout)."""
    pixels = (images.detach().cpu().clamp(0, 1) * 255).round().byte().numpy()
    key = hashlib.sha1(pixels.tobytes()).hexdigest()
    if key not in _SPRITES:
        count, channels, height, width = pixels.shape
        side = math.ceil(math.sqrt(count))
        canvas = np.zeros((side * height, side * width, channels), dtype=np.uint8)
        for i, image in enumerate(pixels):
            row, col = divmod(i, side)
            canvas[row * height : (row + 1) * height, col * width : (col + 1) * width] = (
                image.transpose(1, 2, 0)
            )
        buffer = io.BytesIO()
        Image.fromarray(canvas.squeeze(-1) if channels == 1 else canvas).save(
            buffer, format="PNG", compress_level=1
        )
        while len(_SPRITES) >= _SPRITES_KEPT:
            _SPRITES.pop(next(iter(_SPRITES)))
        _SPRITES[key] = buffer.getvalue()
    return _SPRITES[key]


def write_embedding(
    logdir: Path, codes: Tensor, labels: list[str], images: Tensor, step: int, tag: str
) -> None:
    """Add the embedding ``tag`` at ``step`` to the Projector of ``logdir`` (replacing one
    already there under the same name, e.g. from an attempt that was resumed)."""
    subdir = f"{step:05d}/{tag}"
    folder = logdir / subdir
    folder.mkdir(parents=True, exist_ok=True)
    np.savetxt(folder / "tensors.tsv", codes.detach().cpu().numpy(), delimiter="\t", fmt="%.7g")
    (folder / "metadata.tsv").write_text("".join(f"{label}\n" for label in labels))
    (folder / "sprite.png").write_bytes(sprite(images))

    config = projector.ProjectorConfig()
    config_file = logdir / "projector_config.pbtxt"
    if config_file.is_file():
        with contextlib.suppress(text_format.ParseError, UnicodeDecodeError):  # damaged: start anew
            text_format.Merge(config_file.read_text(), config)
    name = f"{tag}:{step:05d}"
    kept = [e for e in config.embeddings if e.tensor_name != name]
    del config.embeddings[:]
    config.embeddings.extend(kept)
    embedding = config.embeddings.add()
    embedding.tensor_name = name
    embedding.tensor_path = f"{subdir}/tensors.tsv"
    embedding.metadata_path = f"{subdir}/metadata.tsv"
    embedding.sprite.image_path = f"{subdir}/sprite.png"
    embedding.sprite.single_image_dim.extend([images.shape[-1], images.shape[-2]])
    write_atomically(config_file, text_format.MessageToString(config))
