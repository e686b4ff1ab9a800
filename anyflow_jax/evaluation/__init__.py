"""Evaluation of generators on the moving-digits benchmark (``python -m anyflow_jax.evaluate``).

* :mod:`~anyflow_jax.evaluation.classifier` - a small video classifier trained on real
  moving-digit videos only (digit and motion heads; its embedding is the metric's feature space).
* :mod:`~anyflow_jax.evaluation.metrics` - Fréchet distance, conditional accuracy and the
  distance to a reference ODE solution.
"""
from anyflow_jax.evaluation.classifier import (
    ClassifierConfig,
    TrainedClassifier,
    VideoClassifier,
    load_or_train,
    motion_bayes_accuracy,
    real_videos,
    train_classifier,
)
from anyflow_jax.evaluation.metrics import conditional_accuracy, frechet_distance, ode_distance

__all__ = ["ClassifierConfig", "TrainedClassifier", "VideoClassifier", "load_or_train", "motion_bayes_accuracy", "real_videos",
           "train_classifier", "conditional_accuracy", "frechet_distance", "ode_distance"]
