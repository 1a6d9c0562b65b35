"""The MNIST loader on small IDX files written here, and its errors on broken ones."""

import os

import pytest
import torch
from conftest import no_network

from pruning import data as mnist


def write_idx(path, magic, data):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in data.shape)
    path.write_bytes(header + data.numpy().tobytes())


def fake_mnist(root, n_train=5, n_test=3):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = torch.arange(n * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 28, 28)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", 0x803, images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", 0x801, torch.arange(n, dtype=torch.uint8) % 10)
    return raw


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    no_network(monkeypatch)


def test_loads_flat_images_with_values_from_0_to_1(tmp_path):
    fake_mnist(tmp_path)
    (x, y), (x_test, y_test) = mnist.load(tmp_path)
    assert x.shape == (5, 784) and x_test.shape == (3, 784) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 3, 4] and y_test.tolist() == [0, 1, 2] and y.dtype == torch.int64
    assert x[0, 0].item() == 0  # pixel value 0
    assert x[0, 255].item() == 1  # pixel value 255


def test_validation_holds_out_the_last_training_images(tmp_path):
    fake_mnist(tmp_path)
    (x, y), (x_val, y_val), (x_test, y_test) = mnist.load(tmp_path, validation=2)
    assert y.tolist() == [0, 1, 2] and y_val.tolist() == [3, 4] and y_test.tolist() == [0, 1, 2]
    with pytest.raises(mnist.DataError, match="leaves no training images"):
        mnist.load(tmp_path, validation=5)


def broken(raw, name):
    path = raw / name
    return path, path.read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda path, data: path.write_bytes(data[:-10]), "is truncated or corrupted"),
    (lambda path, data: path.write_bytes(data + b"\0"), "is truncated or corrupted"),
    (lambda path, data: path.write_bytes(b"\x00\x00\x08\x01" + data[4:]), "is not an MNIST IDX file"),
    (lambda path, data: path.write_bytes(b""), "is not an MNIST IDX file"),
    (lambda path, data: (path.unlink(), path.mkdir()), "is not a regular file"),
    (lambda path, data: (path.unlink(), os.mkfifo(path)), "is not a regular file"),
])
def test_broken_files_are_reported_in_one_line(tmp_path, damage, message):
    raw = fake_mnist(tmp_path)
    damage(*broken(raw, "train-images-idx3-ubyte"))
    with pytest.raises(mnist.DataError, match=message) as error:
        mnist.load(tmp_path)
    assert "train-images-idx3-ubyte" in str(error.value) and "\n" not in str(error.value)


def test_labels_out_of_range_are_rejected(tmp_path):
    raw = fake_mnist(tmp_path)
    write_idx(raw / "t10k-labels-idx1-ubyte", 0x801, torch.tensor([1, 2, 11], dtype=torch.uint8))
    with pytest.raises(mnist.DataError, match="one label 0-9"):
        mnist.load(tmp_path)


@pytest.mark.parametrize("make", [lambda root: None, lambda root: root.mkdir()])
def test_missing_data_names_the_folder_and_leaves_nothing_behind(tmp_path, make):
    root = tmp_path / "mnist"
    make(root)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(mnist.DataError, match="the download failed") as error:
        mnist.load(root)
    message = str(error.value)
    assert str((root / "MNIST" / "raw").resolve()) in message and "\n" not in message
    assert all(name in message for name in mnist.FILES)
    assert "--data-dir" in message and "$MNIST_DATA_DIR" in message
    assert "Connection refused" in message and "RuntimeError" not in message
    assert sorted(tmp_path.rglob("*")) == before


def test_a_file_of_no_images_is_refused(tmp_path):
    raw = fake_mnist(tmp_path)
    write_idx(raw / "t10k-images-idx3-ubyte", 0x803, torch.zeros(0, 28, 28, dtype=torch.uint8))
    with pytest.raises(mnist.DataError, match="holds no images"):
        mnist.load(tmp_path)


def test_a_header_claiming_more_than_the_file_holds_is_refused_before_allocating(tmp_path):
    raw = fake_mnist(tmp_path)
    header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (2**31, 28, 28))
    (raw / "train-images-idx3-ubyte").write_bytes(header + bytes(100))
    with pytest.raises(mnist.DataError, match="is truncated or corrupted"):
        mnist.load(tmp_path)


def test_data_root_prefers_the_option_then_the_environment(monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", "/from/env")
    assert str(mnist.data_root("/from/option")) == "/from/option"
    assert str(mnist.data_root()) == "/from/env"
    monkeypatch.delenv("MNIST_DATA_DIR")
    assert str(mnist.data_root()) == "data"


def test_shifted_moves_each_image_by_at_most_the_pixels_given_and_fills_with_zeros():
    images = torch.zeros(200, 28, 28)
    images[:, 10, 20] = 1  # one lit pixel each
    moved = mnist.shifted(images.flatten(1), 2, torch.Generator().manual_seed(0)).view(200, 28, 28)
    assert (moved.flatten(1).sum(1) == 1).all()  # nothing lost or added at this distance from the edges
    rows, columns = moved.flatten(1).argmax(1).div(28, rounding_mode="floor"), moved.flatten(1).argmax(1) % 28
    assert {(r - 10, c - 20) for r, c in zip(rows.tolist(), columns.tolist())} == \
        {(dr, dc) for dr in range(-2, 3) for dc in range(-2, 3)}  # all 25 moves, none further
    assert torch.equal(mnist.shifted(images, 0), images)


def test_shifted_keeps_the_shape_and_lets_pixels_fall_off_the_edge():
    images = torch.zeros(64, 1, 28, 28)
    images[:, 0, 0, 0] = 1  # the corner: three moves of four keep it, one of four loses it in each direction
    moved = mnist.shifted(images, 1, torch.Generator().manual_seed(1))
    assert moved.shape == images.shape and images[:, 0, 0, 0].sum() == 64
    assert 0 < moved.sum() < 64 and set(moved.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="28x28 images, not images of shape"):
        mnist.shifted(torch.zeros(2, 3, 32, 32), 1)


def test_dropped_zeroes_pixels_at_the_rate_given_and_scales_the_rest_to_keep_the_mean():
    images = torch.ones(500, 784)
    out = mnist.dropped(images, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out.unique(), torch.tensor([0.0, 4 / 3]))  # kept pixels scaled by 1 / (1 - 0.25)
    assert abs((out == 0).float().mean().item() - 0.25) < 0.01 and abs(out.mean().item() - 1) < 0.02
    again = mnist.dropped(images, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(images, torch.ones(500, 784))  # seeded; a copy
