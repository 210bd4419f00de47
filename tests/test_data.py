"""The data module on the real MNIST and Fashion-MNIST files."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from genlab.data import BatchLoader, ImageDataModule
from genlab.data.files import OFFICIAL_SHA256, sha256
from genlab.errors import GenlabError


@pytest.fixture(scope="module")
def mnist(data_dir) -> ImageDataModule:
    dm = ImageDataModule("mnist", data_dir, batch_size=128, val_size=5000, download=False)
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_splits_are_decoded_once_into_tensors(data_dir, dataset):
    dm = ImageDataModule(dataset, data_dir, val_size=5000, download=False)
    dm.setup("fit")
    dm.setup("test")
    sizes = {name: len(images) for name, (images, _) in dm.splits.items()}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000}
    for images, labels in dm.splits.values():
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 28, 28)
        assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.99
        assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == set(range(10))


def test_validation_split_is_seeded_and_disjoint_from_training(data_dir, mnist):
    again = ImageDataModule("mnist", data_dir, val_size=5000, download=False)
    again.setup("fit")
    assert torch.equal(again.splits["val"][0], mnist.splits["val"][0])

    other = ImageDataModule("mnist", data_dir, val_size=5000, split_seed=1, download=False)
    other.setup("fit")
    assert not torch.equal(other.splits["val"][0], mnist.splits["val"][0])

    # No validation image also sits in the training split (compare exact pixel contents).
    train_keys = {row.tobytes() for row in (mnist.splits["train"][0][:, 0] * 255).byte().numpy()}
    val_keys = [row.tobytes() for row in (mnist.splits["val"][0][:500, 0] * 255).byte().numpy()]
    assert sum(key in train_keys for key in val_keys) < 5  # MNIST has a few exact duplicates


def test_training_batches_cover_the_epoch_in_a_seeded_order(mnist):
    loader = mnist.train_dataloader()
    assert len(loader) == -(-55000 // 128)

    def epoch_labels(epoch: int) -> torch.Tensor:
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert all(len(x) == len(y) for x, y in batches)
        assert sum(len(y) for _, y in batches) == 55000
        return torch.cat([y for _, y in batches])

    first, first_again, second = epoch_labels(0), epoch_labels(0), epoch_labels(1)
    assert torch.equal(first, first_again)  # same seed and epoch: same order
    assert not torch.equal(first, second)  # a new epoch: a new order
    assert torch.equal(first.sort().values, mnist.splits["train"][1].sort().values)


def test_evaluation_batches_keep_the_stored_order(mnist):
    batches = list(mnist.test_dataloader())
    assert len(batches) == 10
    assert torch.equal(torch.cat([x for x, _ in batches]), mnist.splits["test"][0])


def test_static_binarisation_is_one_fixed_sample(data_dir):
    a = ImageDataModule("mnist", data_dir, binarize="static", download=False)
    b = ImageDataModule("mnist", data_dir, binarize="static", download=False)
    for dm in (a, b):
        dm.setup("fit")
    images = a.splits["train"][0]
    assert set(images.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(images, b.splits["train"][0])


def test_dynamic_binarisation_resamples_training_batches_each_epoch(data_dir, mnist):
    dm = ImageDataModule("mnist", data_dir, binarize="dynamic", download=False)
    dm.setup("fit")
    # The training split itself stays grey-level; evaluation data is one fixed binary sample.
    assert torch.equal(dm.splits["train"][0], mnist.splits["train"][0])
    assert set(dm.splits["val"][0].unique().tolist()) == {0.0, 1.0}

    grey = dm.splits["train"][0][:512]
    loader = BatchLoader(grey, torch.arange(512), batch_size=512, binarize_dynamic=True)
    (first, _), (again, _) = next(iter(loader)), next(iter(loader))
    loader.sampler.set_epoch(1)
    (second, _) = next(iter(loader))
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first, again)  # seeded by the epoch
    assert not torch.equal(first, second)  # the same images, freshly sampled
    # Each pixel is on with probability equal to its grey level.
    assert (first.mean() - grey.mean()).abs() < 0.01


def test_batch_loader_on_plain_tensors():
    images, labels = torch.rand(10, 1, 28, 28), torch.arange(10)
    batches = list(BatchLoader(images, labels, batch_size=4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), labels)


def test_missing_data_names_the_folder_and_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.delenv("GENLAB_DATA_DIR", raising=False)
    dm = ImageDataModule("fashion_mnist", tmp_path / "nowhere", download=False)
    with pytest.raises(GenlabError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str((tmp_path / "nowhere").resolve()) in message
    assert "GENLAB_DATA_DIR" in message and "data.data_dir" in message
    assert "FashionMNIST" in message


@pytest.mark.parametrize(
    ("option", "kwargs", "named"),
    [
        ("data.dataset", {"dataset": "cifar10"}, "fashion_mnist"),
        ("data.binarize", {"binarize": "yes"}, "dynamic"),
    ],
)
def test_bad_choices_name_the_option_and_the_valid_values(option, kwargs, named):
    with pytest.raises(GenlabError, match=option) as err:
        ImageDataModule(**kwargs)
    assert named in str(err.value)


def test_val_size_out_of_range(data_dir):
    dm = ImageDataModule("mnist", data_dir, val_size=60000, download=False)
    with pytest.raises(GenlabError, match="data.val_size=60000"):
        dm.setup("fit")


def test_each_process_gets_its_share_of_every_split(data_dir):
    dm = ImageDataModule("mnist", data_dir, download=False)
    dm.trainer = SimpleNamespace(
        world_size=2, global_rank=1, strategy=SimpleNamespace(root_device="cpu")
    )
    dm.setup(None)
    # 55,000 training images: 430 batches of 128, 215 per process; 5 of 1,000 for validation.
    assert len(dm.train_dataloader()) == 215
    assert len(dm.val_dataloader()) == 2  # batches 1 and 3 of 0..4
    assert len(dm.test_dataloader()) == 5  # 10 test batches


# -- integrity of the IDX files (on copies in tmp_path; the shared data stays untouched) ---------

RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
RAW_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def data_copy(tmp_path, data_dir, folder="MNIST", **replacements: bytes):
    """A data folder whose files link to the real ones, except ``replacements`` (name -> bytes)."""
    raw = tmp_path / "data" / folder / "raw"
    raw.mkdir(parents=True)
    for name in RAW + RAW_TEST:
        source = data_dir / folder / "raw" / name
        key = name.replace("-", "_")
        if key in replacements:
            (raw / name).write_bytes(replacements[key])
        else:
            (raw / name).symlink_to(source.resolve())
    return tmp_path / "data"


def labels_file(labels: list[int]) -> bytes:
    return struct.pack(">II", 0x801, len(labels)) + bytes(labels)


@pytest.mark.parametrize(
    ("name", "corrupt", "words"),
    [
        ("train_images_idx3_ubyte", lambda b: b[: len(b) // 2], ["truncated", "47040016 bytes"]),
        ("train_images_idx3_ubyte", lambda b: b[:3], ["fewer than an IDX header"]),
        ("train_labels_idx1_ubyte", lambda b: b"\x00\x00\x08\x03" + b[4:], ["magic number"]),
        (
            "train_images_idx3_ubyte",
            lambda b: b[:8] + struct.pack(">II", 32, 32) + b[16:],
            ["(32, 32)"],
        ),
    ],
)
def test_a_corrupt_file_is_named(data_dir, tmp_path, name, corrupt, words):
    original = (data_dir / "MNIST" / "raw" / name.replace("_", "-")).read_bytes()
    root = data_copy(tmp_path, data_dir, **{name: corrupt(original)})
    with pytest.raises(GenlabError) as err:
        ImageDataModule("mnist", root, download=False).prepare_data()
    message = str(err.value)
    assert name.replace("_", "-") in message and "\n" not in message
    for word in words:
        assert word in message, message


def test_images_and_labels_must_agree(data_dir, tmp_path):
    root = data_copy(tmp_path, data_dir, t10k_labels_idx1_ubyte=labels_file([1, 2, 3]))
    with pytest.raises(GenlabError, match="10000 images but .*t10k-labels-idx1-ubyte.* 3 labels"):
        ImageDataModule("mnist", root, download=False).prepare_data()


def test_labels_outside_the_ten_classes_are_refused(data_dir, tmp_path):
    labels = (data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    root = data_copy(tmp_path, data_dir, t10k_labels_idx1_ubyte=labels[:-1] + b"\x0b")
    with pytest.raises(GenlabError, match="t10k-labels-idx1-ubyte.*outside 0..9"):
        ImageDataModule("mnist", root, download=False).prepare_data()


def test_verify_accepts_the_official_mnist_files(data_dir):
    dm = ImageDataModule("mnist", data_dir, download=False, verify=True)
    dm.prepare_data()  # the shared MNIST copy is byte-identical to the official release
    assert {sha256(data_dir / "MNIST" / "raw" / n) for n in RAW + RAW_TEST} == set(
        OFFICIAL_SHA256["MNIST"].values()
    )


def test_verify_names_a_file_that_is_not_the_official_one(data_dir, tmp_path):
    labels = (data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte").read_bytes()
    swapped = labels[:8] + bytes([labels[9], labels[8]]) + labels[10:]  # still a valid file
    root = data_copy(tmp_path, data_dir, train_labels_idx1_ubyte=swapped)
    ImageDataModule("mnist", root, download=False).prepare_data()  # fine without verify
    with pytest.raises(GenlabError) as err:
        ImageDataModule("mnist", root, download=False, verify=True).prepare_data()
    assert "train-labels-idx1-ubyte" in str(err.value)
    assert OFFICIAL_SHA256["MNIST"]["train-labels-idx1-ubyte"] in str(err.value)
    assert "data.verify=false" in str(err.value)


def test_a_data_dir_whose_parent_is_missing_is_a_typo_not_a_download(tmp_path):
    dm = ImageDataModule("mnist", tmp_path / "no" / "such" / "folder", download=True)
    with pytest.raises(GenlabError, match="no download was tried"):
        dm.prepare_data()
    assert not (tmp_path / "no").exists()


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    from genlab.data import datamodule

    def offline(root, train, download):  # torchvision makes its folders, then fails to fetch
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nNo route to host")

    offline.__name__ = "MNIST"
    monkeypatch.setitem(datamodule.DATASETS, "mnist", offline)
    (tmp_path / "kept").mkdir()  # a data folder the user made stays
    for root in (tmp_path / "data", tmp_path / "kept"):
        with pytest.raises(GenlabError, match=r"downloading it failed \(No route to host\)"):
            ImageDataModule("mnist", root, download=True).prepare_data()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert not list((tmp_path / "kept").iterdir())


def test_the_loader_resumes_mid_epoch_where_it_stopped(data_dir):
    images, labels = torch.rand(10, 1, 28, 28), torch.arange(10)
    loader = BatchLoader(images, labels, batch_size=3, shuffle=True, binarize_dynamic=True)
    loader.sampler.set_epoch(4)
    full = list(loader)
    partial = iter(loader)
    next(partial), next(partial)
    state = loader.state_dict()
    assert state == {"epoch": 4, "batches": 2}

    resumed = BatchLoader(images, labels, batch_size=3, shuffle=True, binarize_dynamic=True)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(4)
    rest = list(resumed)
    assert len(rest) == 2
    for (x, y), (x_full, y_full) in zip(rest, full[2:]):
        assert torch.equal(y, y_full) and torch.equal(x, x_full)  # same order, same binary sample
    # A state saved at the end of an epoch does not cut the next epoch short.
    resumed.load_state_dict({"epoch": 4, "batches": 4})
    resumed.sampler.set_epoch(5)
    assert len(list(resumed)) == 4


def test_the_jobs_of_a_process_decode_each_file_once(data_dir, monkeypatch):
    from genlab.data import datamodule

    monkeypatch.setattr(datamodule, "_DECODED", {})
    reads = []
    original = datamodule.DATASETS["mnist"]

    class Counting(original):  # keeps torchvision's folder name, MNIST
        def __init__(self, *args, **kwargs):
            reads.append(kwargs.get("train"))
            super().__init__(*args, **kwargs)

    Counting.__name__ = original.__name__
    monkeypatch.setitem(datamodule.DATASETS, "mnist", Counting)
    first = ImageDataModule("mnist", data_dir, download=False)
    for stage in ("fit", "test"):
        first.prepare_data()  # Lightning calls it before each stage
        first.setup(stage)
    second = ImageDataModule("mnist", data_dir, download=False, split_seed=1)
    second.prepare_data()
    second.setup("fit")
    assert sorted(reads) == [False, True]
    assert not torch.equal(first.splits["val"][0], second.splits["val"][0])
