"""retrac_lib: data attribution for diffusion models, built step by step in the retrac-book.

    import retrac_lib as rl
    data = rl.data.digits()
    run = rl.load_or_train(rl.TrainConfig(), data)
"""
from . import (attribution, baselines, book, cache, checks, claims, config, counterfactual, data,
               diagnostics, distributed, dtrak, ghost, grads, losses, metrics, models, prose, recipes,
               recorder, sampling, training, widgets)
from .attribution import AttributionResult, attribute, load_or_attribute
from .config import TrainConfig, cache_dir, is_smoke
from .grads import per_sample_grads
from .recorder import Recorder
from .sampling import generate
from .training import Checkpoint, Run, TrainingLog, load_or_train, load_run, save_run, train

__version__ = "0.1.0"
