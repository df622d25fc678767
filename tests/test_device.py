"""The chapters' device choice, and CUDA against the CPU: attribution and recording on a GPU match
the CPU to float tolerance. The CUDA tests skip without a GPU (README, "Versions")."""
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

import retrac_lib as rl
from retrac_lib.book import setups

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_chapters_use_a_gpu_exactly_when_one_is_present(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert rl.validation.default_device() == expected
    assert setups.attribution_options(smoke=True)["device"] == expected
    assert setups.counterfactual_setup(smoke=True).attribution["device"] == expected


@cuda
@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_attribution_on_cuda_equals_cpu(tiny_run, method, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    queries = rl.data.digits("test").images[:2]
    opts = dict(timesteps=4, n_noise=2, progress=False)
    cpu = rl.attribute(tiny_run, queries, method, **opts)
    gpu = rl.attribute(tiny_run, queries, method, device="cuda", **opts)
    assert gpu.scores.device.type == "cpu"
    assert torch.allclose(gpu.scores, cpu.scores, rtol=1e-3, atol=1e-3 * cpu.scores.abs().max().item())
    assert torch.allclose(gpu.train_grad_norms, cpu.train_grad_norms, rtol=1e-3)


@cuda
def test_recorder_takes_a_loop_on_cuda(tiny_digits):
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(8, 16), norm_num_groups=4, add_attention=False,
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).cuda()
    scheduler = DDPMScheduler()
    recorder = rl.Recorder(model, scheduler, tiny_digits)
    images = tiny_digits.images.cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for idx in torch.arange(len(images), device="cuda").split(16):
        noise = torch.randn(len(idx), 1, 8, 8, device="cuda")
        t = torch.randint(0, 1000, (len(idx),), device="cuda")
        loss = (model(scheduler.add_noise(images[idx], noise, t), t).sample - noise).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        recorder.step(idx, t, noise, 1e-3, loss=loss.item(), images=images[idx])
    recorder.checkpoint(model)
    run = recorder.close()
    assert run.log.noise.device.type == "cpu" and run.checkpoints[0].params["conv_in.weight"].device.type == "cpu"
    res = rl.attribute(run, images[:1].cpu(), "retrac", timesteps=3, n_noise=2, device="cuda", progress=False)
    assert res.scores.shape == (1, len(tiny_digits)) and torch.isfinite(res.scores).all()
