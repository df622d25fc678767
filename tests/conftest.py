import pytest
import torch

import retrac_lib as rl


@pytest.fixture(scope="session")
def tiny_digits():
    """40 training digits: enough for full batches and a few checkpoints in a second."""
    return rl.data.digits("train").subset(range(40), name="tiny-digits")


@pytest.fixture(scope="session")
def tiny_config():
    return rl.TrainConfig(block_out_channels=(8, 16), epochs=3, batch_size=16, checkpoint_every=1)


@pytest.fixture(scope="session")
def tiny_run(tiny_config, tiny_digits, tmp_path_factory):
    return rl.load_or_train(tiny_config, tiny_digits, progress=False,
                            root=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_points_run(tmp_path_factory):
    cfg = rl.TrainConfig(model="mlp", clip_sample=False, mlp_hidden=32, epochs=3,
                         batch_size=16, checkpoint_every=1)
    return rl.load_or_train(cfg, rl.data.moons(n=48), progress=False,
                            root=tmp_path_factory.mktemp("cache-points"))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)
