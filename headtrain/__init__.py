"""headtrain: everything after the store: training, evaluation, prediction and export."""

from .evaluate import EvaluateConfig, evaluate
from .export import export
from .predict import PredictConfig, predict
from .train import TrainConfig, TrainResult, train

__all__ = ['EvaluateConfig', 'evaluate', 'export', 'PredictConfig', 'predict', 'TrainConfig', 'TrainResult', 'train']
