"""The data files themselves: an IDX file checked against its own header, and against
the official release's SHA-256 (``data.verify=true``), before anything decodes it."""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path

from genlab.errors import GenlabError

# SHA-256 of the official IDX files after gunzip. The releases publish checksums of
# their .gz archives only; these digests of the unpacked files are the ones independent
# public projects pin. Keyed by torchvision's folder name, then file name.
OFFICIAL_SHA256 = {
    "MNIST": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}


def check_idx(path: Path, ndim: int, item_shape: tuple[int, ...]) -> int:
    """Check an IDX file of unsigned bytes against its own header; return its item count.

    The header is a magic number (0x0000 08 <ndim>) and ``ndim`` big-endian
    sizes; the file must hold exactly the bytes those sizes announce.
    """
    magic = 0x0800 + ndim
    size = path.stat().st_size
    header_size = 4 + 4 * ndim
    with path.open("rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        problem = f"it has {size} bytes, fewer than an IDX header needs"
    elif struct.unpack(">I", header[:4])[0] != magic:
        problem = (
            f"its magic number is 0x{header[:4].hex()}, not 0x{magic:08x} "
            f"(unsigned bytes in {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    else:
        count, *shape = struct.unpack(f">{ndim}I", header[4:])
        expected = header_size + count * math.prod(shape)
        if tuple(shape) != item_shape:
            problem = f"its items have shape {tuple(shape)}, not {item_shape}"
        elif size != expected:
            problem = (
                f"its header announces {count} items ({expected} bytes) but the file has "
                f"{size} bytes, so it is truncated or corrupt"
            )
        else:
            return count
    raise GenlabError(
        f"{str(path)!r} is not a valid IDX file: {problem}. Replace it with an intact copy "
        f"(or delete it and run with data.download=true to fetch it again)."
    )


def check_pair(images: Path, labels: Path, image_size: tuple[int, int]) -> None:
    """Check a split's image and label files, and that they hold as many items."""
    count, label_count = check_idx(images, 3, image_size), check_idx(labels, 1, ())
    if label_count != count:
        raise GenlabError(
            f"{str(images)!r} holds {count} images but {str(labels)!r} holds {label_count} "
            f"labels: the two files do not belong together. Replace them with an intact pair."
        )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_official(dataset: str, folder: str, *paths: Path) -> None:
    """Refuse any of ``paths`` whose SHA-256 is not that of the official file of its name."""
    official = OFFICIAL_SHA256[folder]
    for path in paths:
        digest = sha256(path)
        if digest != official[path.name]:
            raise GenlabError(
                f"{str(path)!r} is not the official {dataset} file: its SHA-256 is "
                f"{digest}, the official one is {official[path.name]} (data.verify=true). "
                f"It may be corrupt or a rebuilt copy; replace it with the official file, or "
                f"set data.verify=false to train on it as it is."
            )
