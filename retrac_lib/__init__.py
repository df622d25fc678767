"""retrac_lib: data attribution for diffusion models, built step by step in the retrac-book.

    import retrac_lib as rl
    data = rl.data.digits()
    run = rl.load_or_train(rl.TrainConfig(), data)
    res = rl.attribute(run, queries, method="retrac")

The names below are the stable public surface; the core modules in ``_MODULES`` load on first use
as ``rl.<module>`` (ARCHITECTURE.md says which layer each belongs to). The evaluation
(``retrac_lib.evaluation``) and the book's own modules (``retrac_lib.book``, the ``[book]`` extra)
are imported explicitly: ``from retrac_lib.book import plots``. Importing ``retrac_lib`` loads
neither, nor matplotlib or ipywidgets.
"""
import importlib

from .attribution import AttributionResult, attribute, load_or_attribute
from .config import TrainConfig, cache_dir, is_smoke
from .grads import per_sample_grads
from .recorder import Recorder
from .runs import Run, load_run, save_run
from .sampling import generate
from .training import load_or_train, train

_MODULES = (
    "attribution", "cache", "config", "data", "diagnostics", "distributed", "dtrak", "ensemble",
    "ghost", "grads", "losses", "machine", "models", "projection", "ranking", "recorder", "runs",
    "sampling", "timesteps", "training", "validation",
)

__all__ = [
    "AttributionResult", "attribute", "load_or_attribute", "TrainConfig", "cache_dir", "is_smoke",
    "per_sample_grads", "Recorder", "generate", "Run", "load_or_train", "load_run", "save_run",
    "train", *_MODULES,
]

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'retrac_lib' has no attribute {name!r}")
