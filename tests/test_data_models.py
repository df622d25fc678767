"""Data loaders and models: shapes, ranges and clear errors."""
import pytest
import torch

import retrac_lib as rl


def test_digits_are_8x8_in_range_with_a_stratified_split():
    d = rl.data.digits()
    assert d.images.shape == (1797, 1, 8, 8) and d.labels.shape == (1797,)
    assert d.images.min() == -1 and d.images.max() == 1
    train, test = rl.data.digits("train"), rl.data.digits("test")
    assert len(train) + len(test) == 1797
    assert torch.bincount(test.labels).min() >= 30  # every digit is held out
    assert d.fingerprint() != train.fingerprint()
    assert train.fingerprint() == rl.data.digits("train").fingerprint()


def test_point_clouds_are_standardized():
    for d in (rl.data.moons(n=200), rl.data.gaussian_mixture(n=200, centers=3)):
        assert d.images.shape == (200, 2)
        assert torch.allclose(d.images.mean(0), torch.zeros(2), atol=1e-5)
        assert torch.allclose(d.images.std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert set(rl.data.gaussian_mixture(n=200, centers=3).labels.tolist()) == {0, 1, 2}


def test_group_norm_divisibility_is_checked():
    with pytest.raises(ValueError, match=r"\(12, 32\) must all divide by norm_num_groups=8.*\[12\]"):
        rl.TrainConfig(block_out_channels=(12, 32))


def test_wrong_sample_shapes_are_refused():
    with pytest.raises(ValueError, match="UNet takes square images"):
        rl.models.build_model(rl.TrainConfig(), (2,))
    with pytest.raises(ValueError, match="MLP denoiser takes 2-D points"):
        rl.models.build_model(rl.TrainConfig(model="mlp"), (1, 8, 8))
    model = rl.models.build_model(rl.TrainConfig(), (1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(4, 1, 7, 7\).*\[B, 1, 8, 8\]"):
        rl.models.check_samples(model, torch.zeros(4, 1, 7, 7))


def test_book_unet_has_the_documented_size():
    model = rl.models.build_model(rl.TrainConfig(), (1, 8, 8))
    assert rl.models.n_params(model) == 159_697
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 999])).sample.shape == (2, 1, 8, 8)


def test_building_a_model_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    rl.models.build_model(rl.TrainConfig(), (1, 8, 8))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0.0, "lr must be positive"),
    ("norm_num_groups", 0, "norm_num_groups must be >= 1"),
    ("block_out_channels", (), "at least one UNet level"),
])
def test_config_refuses_degenerate_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        rl.TrainConfig(**{field: value})
