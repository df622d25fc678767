"""Per-sample gradients: torch.func (vmap) against the plain autograd loop, and clear input errors."""
import pytest
import torch

import retrac_lib as rl
from retrac_lib.grads import per_sample_grads_loop
from retrac_lib.losses import diffusion_loss

# grouped_grads has two exact paths: vmap(grad) over several groups per chunk, and one plain
# backward pass when a group fills the chunk by itself (chunk_size=1 forces it per sample).
ENGINES = ["vmap", "backward"]


def _per_sample(engine, model, scheduler, x, t, eps, loss="mse", chunk_size=64):
    chunk_size = 1 if engine == "backward" else max(chunk_size, 2)
    return rl.per_sample_grads(model, scheduler, x, t, eps, loss=loss, chunk_size=chunk_size)


def _batch(run, n, c=-1):
    t, eps = run.recorded(c)
    # Spread the batch over the training set so it mixes small and large recorded timesteps.
    idx = torch.linspace(0, len(run.data) - 1, n).long()
    return run.data.images[idx], t[idx], eps[idx]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=["unet", "mlp"])
def any_run(request, tiny_run, tiny_points_run):
    return tiny_run if request.param == "unet" else tiny_points_run


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loss", ["mse", "l1"])
@pytest.mark.parametrize("weights", ["trained", "init"])
def test_vmap_matches_loop_float32(any_run, loss, weights, engine):
    run = any_run
    model = run.model_at(-1) if weights == "trained" else run.initial_model()
    x, t, eps = _batch(run, 10)
    fast = _per_sample(engine, model, run.scheduler, x, t, eps, loss=loss, chunk_size=4)
    slow = per_sample_grads_loop(model, run.scheduler, x, t, eps, loss=loss)
    assert fast.shape == (10, rl.models.n_params(model))
    assert fast.dtype == torch.float32
    # Whole-matrix relative error: float32 rounding differs between batched and single kernels.
    assert _rel(fast, slow) <= 1e-5
    # Row by row too, with float32 headroom (rows with tiny norms lose relative precision).
    per_row = (fast - slow).norm(dim=1) / slow.norm(dim=1)
    assert per_row.max().item() <= 1e-4


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_vmap_matches_loop_row_by_row_in_float64(any_run, loss, engine):
    run = any_run
    model = run.model_at(-1).double()
    x, t, eps = _batch(run, 7)
    fast = _per_sample(engine, model, run.scheduler, x.double(), t, eps.double(), loss=loss, chunk_size=3)
    slow = per_sample_grads_loop(model, run.scheduler, x.double(), t, eps.double(), loss=loss)
    assert fast.dtype == torch.float64
    per_row = (fast - slow).norm(dim=1) / slow.norm(dim=1)
    assert per_row.max().item() <= 1e-10


def test_rows_average_to_the_batch_gradient_training_uses(tiny_run):
    """Independent of both implementations: the mean of the rows is the gradient of the mean loss."""
    run = tiny_run
    model = run.model_at(0)
    x, t, eps = _batch(run, 12, c=0)
    rows = rl.per_sample_grads(model, run.scheduler, x, t, eps, chunk_size=5)
    model.zero_grad()
    diffusion_loss(model, run.scheduler, x, t, eps).mean().backward()
    batch = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert _rel(rows.mean(0), batch) <= 1e-5


def test_row_i_belongs_to_sample_i_and_chunking_does_not_matter(tiny_points_run):
    run = tiny_points_run
    model = run.model_at(-1)
    x, t, eps = _batch(run, 9)
    ref = rl.per_sample_grads(model, run.scheduler, x, t, eps, chunk_size=64)
    for chunk in (1, 2, 4, 9):
        assert _rel(rl.per_sample_grads(model, run.scheduler, x, t, eps, chunk_size=chunk), ref) <= 1e-6
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    permuted = rl.per_sample_grads(model, run.scheduler, x[perm], t[perm], eps[perm])
    assert _rel(permuted, ref[perm]) <= 1e-6


def test_frozen_parameters_are_left_out(tiny_points_run):
    run = tiny_points_run
    model = run.model_at(-1)
    model.input.weight.requires_grad_(False)
    x, t, eps = _batch(run, 3)
    fast = rl.per_sample_grads(model, run.scheduler, x, t, eps)
    assert fast.shape[1] == rl.models.n_params(model) == sum(
        p.numel() for n, p in model.named_parameters() if n != "input.weight")
    assert _rel(fast, per_sample_grads_loop(model, run.scheduler, x, t, eps)) <= 1e-5


def test_empty_batch_gives_no_rows(tiny_points_run):
    run = tiny_points_run
    model = run.model_at(-1)
    out = rl.per_sample_grads(model, run.scheduler, torch.empty(0, 2), torch.empty(0, dtype=torch.long),
                              torch.empty(0, 2))
    assert out.shape == (0, rl.models.n_params(model))


def test_clear_errors_for_bad_inputs(tiny_run):
    run = tiny_run
    model = run.model_at(-1)
    x, t, eps = _batch(run, 4)
    sched = run.scheduler
    with pytest.raises(ValueError, match=r"must describe the same batch"):
        rl.per_sample_grads(model, sched, x, t[:3], eps)
    with pytest.raises(ValueError, match=r"must describe the same batch"):
        rl.per_sample_grads(model, sched, x, t, eps[:3])
    with pytest.raises(ValueError, match=r"must describe the same batch"):
        rl.per_sample_grads(model, sched, x, t[:, None], eps)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\); got values in \[-1, "):
        rl.per_sample_grads(model, sched, x, torch.tensor([-1, 0, 5, 7]), eps)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\); got values in \[0, 1000\]"):
        rl.per_sample_grads(model, sched, x, torch.tensor([0, 1, 2, 1000]), eps)
    with pytest.raises(ValueError, match=r"timesteps t must be integers.*float32"):
        rl.per_sample_grads(model, sched, x, t.float(), eps)
    with pytest.raises(ValueError, match=r"x has shape \(4, 1, 16, 16\), but this model takes batches "
                                         r"of shape \[B, 1, 8, 8\]"):
        big = torch.zeros(4, 1, 16, 16)
        rl.per_sample_grads(model, sched, big, t, big)
    with pytest.raises(ValueError, match=r"x has shape \(4, 64\)"):
        flat = x.flatten(1)
        rl.per_sample_grads(model, sched, flat, t, flat)
    with pytest.raises(ValueError, match=r"loss must be one of .*got 'l2'"):
        rl.per_sample_grads(model, sched, x, t, eps, loss="l2")
    # The reference loop refuses the same inputs.
    with pytest.raises(ValueError, match=r"must describe the same batch"):
        per_sample_grads_loop(model, sched, x, t[:3], eps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_cuda_matches_cpu(any_run, loss, monkeypatch):
    # TF32 convolutions and matmuls (the CUDA default for convs) round to ~1e-3; compare in full float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    run = any_run
    x, t, eps = _batch(run, 8)
    cpu = rl.per_sample_grads(run.model_at(-1), run.scheduler, x, t, eps, loss=loss)
    gpu_model = run.model_at(-1).to("cuda")
    gpu = rl.per_sample_grads(gpu_model, run.scheduler, x, t, eps, loss=loss, chunk_size=3)
    assert gpu.device.type == "cuda"
    loop = per_sample_grads_loop(gpu_model, run.scheduler, x.cuda(), t.cuda(), eps.cuda(), loss=loss)
    assert _rel(gpu, loop) <= 1e-5
    assert _rel(gpu.cpu(), cpu) <= 1e-4
