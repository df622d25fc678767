"""The denoisers and the noise scheduler: a tiny diffusers UNet for 8x8 images, a small MLP for
2-D points, and diffusers' ``DDPMScheduler``. Chapter 1 introduces them."""
from __future__ import annotations

import dataclasses
import json

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .config import TrainConfig


class DenoiserOutput(BaseOutput):
    """Same field as diffusers' ``UNet2DOutput``: the predicted noise in ``sample``."""

    sample: torch.Tensor


class MLPDenoiser(ModelMixin, ConfigMixin):
    """Predicts the noise of a 2-D point from the point and a sinusoidal timestep embedding.

    Called like a diffusers UNet: ``model(x_t, t).sample``.
    """

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, time_dim: int = 32):
        super().__init__()
        self.time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_dim, hidden)
        self.input = torch.nn.Linear(dim, hidden)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(layers))
        self.output = torch.nn.Linear(hidden, dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> DenoiserOutput:
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        t = t * torch.ones(sample.shape[0], dtype=t.dtype, device=sample.device)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        h = self.input(sample) + emb
        for block in self.blocks:
            h = h + block(torch.nn.functional.silu(h))
        return DenoiserOutput(sample=self.output(torch.nn.functional.silu(h)))


def build_model(config, sample_shape: tuple[int, ...]) -> torch.nn.Module:
    """A freshly initialised denoiser (seeded by ``config.seed``) for samples of ``sample_shape``.

    The global random state is restored afterwards, so building a model never repeats the
    caller's own random draws. A ``ModelSpec`` (a recorded run) builds its diffusers model.
    """
    if isinstance(config, ModelSpec):
        return config.build_model(sample_shape)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return _build_model(config, sample_shape)


def _build_model(config: TrainConfig, sample_shape: tuple[int, ...]) -> torch.nn.Module:
    if config.model == "mlp":
        if len(sample_shape) != 1:
            raise ValueError(
                f"The MLP denoiser takes 2-D points ([N, 2]); got samples of shape {sample_shape}. "
                "Use TrainConfig(model='unet') for images."
            )
        return MLPDenoiser(dim=sample_shape[0], hidden=config.mlp_hidden, layers=config.mlp_layers)
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ValueError(
            f"The UNet takes square images [N, C, H, W]; got samples of shape {sample_shape}. "
            "Use TrainConfig(model='mlp', clip_sample=False) for 2-D points."
        )
    channels, size, _ = sample_shape
    levels = len(config.block_out_channels)
    if size % 2 ** (levels - 1):
        raise ValueError(
            f"An image side of {size} cannot be halved {levels - 1} times by a UNet with "
            f"block_out_channels {config.block_out_channels}; use fewer levels or larger images."
        )
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=config.norm_num_groups,
        add_attention=False,
    )


def build_scheduler(config) -> DDPMScheduler:
    """The DDPM noise schedule the run trains and samples with (epsilon prediction)."""
    if isinstance(config, ModelSpec):
        return config.build_scheduler()
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        clip_sample=config.clip_sample,
        prediction_type="epsilon",
    )


def sample_shape_of(model: torch.nn.Module) -> tuple[int, ...]:
    """The shape of one sample the model accepts."""
    cfg = model.config
    if isinstance(model, MLPDenoiser):
        return (cfg.dim,)
    size = cfg.sample_size
    return (cfg.in_channels, *(size if isinstance(size, (tuple, list)) else (size, size)))


def check_samples(model: torch.nn.Module, x: torch.Tensor, what: str = "x") -> None:
    """Raise a clear error when ``x`` is not a batch of samples this model accepts."""
    expected = sample_shape_of(model)
    if tuple(x.shape[1:]) != expected or x.ndim != len(expected) + 1:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}, but this model takes batches of shape "
            f"[B, {', '.join(map(str, expected))}]."
        )


def n_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters (the length P of a flattened gradient)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


MODEL_CLASSES = {"UNet2DModel": UNet2DModel, "MLPDenoiser": MLPDenoiser}
SCHEDULER_CLASSES = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}


def _plain_config(config) -> dict:
    """A diffusers config as JSON-equal plain data, without diffusers' private ``_`` keys."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The configuration of a run recorded from a user's own loop (``retrac_lib.recorder``):
    the denoiser and noise scheduler as diffusers configs, and the training loss.

    It stands where ``TrainConfig`` stands for the book's runs: ``build_model`` and
    ``build_scheduler`` rebuild both, and ``to_dict`` keys the cache.
    """

    model_class: str
    model_config: dict
    scheduler_class: str
    scheduler_config: dict
    loss: str

    @classmethod
    def of(cls, model, scheduler, loss: str) -> "ModelSpec":
        """The spec of a live model and scheduler; refuses what attribution cannot replay."""
        model_class, scheduler_class = type(model).__name__, type(scheduler).__name__
        if MODEL_CLASSES.get(model_class) is not type(model):
            raise ValueError(f"model is a {model_class}; the recorder supports "
                             f"{', '.join(MODEL_CLASSES)} (unwrap DDP/accelerate wrappers first).")
        if SCHEDULER_CLASSES.get(scheduler_class) is not type(scheduler):
            raise ValueError(f"noise_scheduler is a {scheduler_class}; the recorder supports "
                             f"{', '.join(SCHEDULER_CLASSES)}.")
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"noise_scheduler predicts {scheduler.config.prediction_type!r}; "
                             "attribution needs the epsilon-prediction loss (prediction_type='epsilon').")
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1' (the loss your loop trains with); got {loss!r}.")
        return cls(model_class, _plain_config(model.config), scheduler_class,
                   _plain_config(scheduler.config), loss)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler_config["num_train_timesteps"]

    def build_model(self, sample_shape=None) -> torch.nn.Module:
        with torch.random.fork_rng():  # like build_model: leave the caller's random draws alone
            model = MODEL_CLASSES[self.model_class].from_config(self.model_config)
        if sample_shape is not None and sample_shape_of(model) != tuple(sample_shape):
            raise ValueError(f"The recorded {self.model_class} takes samples of shape "
                             f"{sample_shape_of(model)}, but the run's data has {tuple(sample_shape)}.")
        return model

    def build_scheduler(self):
        return SCHEDULER_CLASSES[self.scheduler_class].from_config(self.scheduler_config)

    def to_dict(self) -> dict:
        return {"kind": "recorded", **dataclasses.asdict(self)}
