"""CIFAR-10's binary format and the paper's airplanes-plus-zeros design, on fixture files written
in that format (nothing is downloaded): a record is a label byte, then 1024 red, 1024 green and
1024 blue bytes, each plane row by row."""
from __future__ import annotations

import hashlib
import tarfile

import numpy as np
import pytest
import torch

import retrac_lib as rl
from retrac_lib import data as D


def _record(label: int, red: int, green_pixel: tuple[int, int] | None = None) -> bytes:
    planes = np.zeros((3, 32, 32), dtype=np.uint8)
    planes[0] = red
    planes[2, 31, 31] = 200                    # the last byte of the record
    if green_pixel is not None:
        planes[1][green_pixel] = 255
    return bytes([label]) + planes.tobytes()


def _write_fixture(folder, labels_per_batch):
    folder.mkdir(parents=True, exist_ok=True)
    names = D.CIFAR10_FILES["train"] + D.CIFAR10_FILES["test"]
    for b, (name, labels) in enumerate(zip(names, labels_per_batch)):
        records = [_record(lab, red=10 * b + i, green_pixel=(0, 1) if i == 0 else None)
                   for i, lab in enumerate(labels)]
        (folder / name).write_bytes(b"".join(records))
    return folder


@pytest.fixture
def fixture(tmp_path):
    labels = [[0, 3], [0, 0], [1, 9], [0, 2], [5, 0], [0, 7]]   # five train batches, one test
    return _write_fixture(tmp_path / D.CIFAR10_FOLDER, labels)


def test_records_decode_to_channels_rows_and_columns(fixture):
    train = rl.data.cifar10(fixture)
    assert train.images.shape == (10, 3, 32, 32) and train.name == "cifar10-train"
    assert train.labels.tolist() == [0, 3, 0, 0, 1, 9, 0, 2, 5, 0]
    first = train.images[0]
    assert first[1, 0, 1] == 1.0 and first[1, 1, 0] == -1.0      # green (row 0, col 1) = 255
    assert first[2, 31, 31] == pytest.approx(200 / 127.5 - 1)
    reds = train.images[:, 0, 5, 5]
    expected = torch.tensor([0, 1, 10, 11, 20, 21, 30, 31, 40, 41]) / 127.5 - 1
    assert torch.allclose(reds, expected)
    test = rl.data.cifar10(fixture.parent, "test")   # the folder that holds the batches
    assert test.labels.tolist() == [0, 7] and test.name == "cifar10-test"


def test_classes_keep_file_order(fixture):
    planes = rl.data.cifar10(fixture, classes=["airplane"])
    assert planes.labels.tolist() == [0] * 5
    assert torch.allclose(planes.images[:, 0, 0, 0],
                          torch.tensor([0, 10, 11, 30, 41]) / 127.5 - 1)
    assert rl.data.cifar10(fixture, classes=[9, "cat"]).labels.tolist() == [3, 9]
    with pytest.raises(ValueError, match="unknown CIFAR-10 class 'plane'"):
        rl.data.cifar10(fixture, classes=["plane"])


def test_missing_or_damaged_files_are_named(fixture, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_1.bin.*download_cifar10"):
        rl.data.cifar10(tmp_path / "empty")
    (fixture / "data_batch_3.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"data_batch_3.bin is not a CIFAR-10 binary batch: 100"):
        rl.data.cifar10(fixture)
    (fixture / "data_batch_3.bin").write_bytes(_record(12, red=0))
    with pytest.raises(ValueError, match="label byte 12"):
        rl.data.cifar10(fixture)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        rl.data.cifar10(fixture, "val")


def test_the_papers_design_mixes_airplanes_and_mnist_zeros(fixture):
    mixed = rl.data.cifar_airplanes_with_mnist_zeros(fixture, n_airplanes=4, n_zeros=3, seed=1)
    assert mixed.images.shape == (7, 3, 32, 32)
    assert sorted(mixed.labels.tolist()) == [0, 0, 0, 0] + [D.OUTLIER_LABEL] * 3
    zeros = mixed.images[mixed.labels == D.OUTLIER_LABEL]
    assert torch.equal(zeros[:, 0], zeros[:, 1]) and torch.equal(zeros[:, 1], zeros[:, 2])
    mnist_zeros = rl.data.mnist().images[rl.data.mnist().labels == 0][:3, 0]
    assert sorted(z.sum().item() for z in zeros[:, 0]) == sorted(z.sum().item()
                                                                 for z in mnist_zeros)
    again = rl.data.cifar_airplanes_with_mnist_zeros(fixture, n_airplanes=4, n_zeros=3, seed=1)
    assert torch.equal(again.images, mixed.images)
    with pytest.raises(ValueError, match="n_airplanes must be at most 5"):
        rl.data.cifar_airplanes_with_mnist_zeros(fixture, n_airplanes=6, n_zeros=1)


def test_download_checks_the_archive_and_extracts_safely(fixture, tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlretrieve",
                        lambda *a, **k: pytest.fail("downloaded although the archive exists"))
    target = tmp_path / "dl"
    target.mkdir()
    archive = target / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fixture, arcname=D.CIFAR10_FOLDER)
    with pytest.raises(ValueError, match="has MD5 .* not CIFAR-10's"):
        rl.data.download_cifar10(target)
    monkeypatch.setattr(D, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    root = rl.data.download_cifar10(target)
    assert root == target / D.CIFAR10_FOLDER and len(rl.data.cifar10(root)) == 10
