"""The data module on the real MNIST and Fashion-MNIST files."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from genlab.data import BatchLoader, ImageDataModule
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
