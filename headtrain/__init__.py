"""headtrain: everything after the store: training, evaluation, prediction and export."""

from .evaluate import EvaluateConfig, evaluate  # noqa: F401
from .export import export  # noqa: F401
from .predict import PredictConfig, predict  # noqa: F401
from .train import TrainConfig, TrainResult, train  # noqa: F401
