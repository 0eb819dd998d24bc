"""iwae: importance-weighted variational inference (VAE, IWAE and successors) in PyTorch.

Shape convention throughout the package: samples first. Log-weights are ``[k, batch]``,
latent samples ``[k, batch, d]``, data ``[batch, ...]``.

The public API, for your own models and studies:

- the model protocol: :class:`Model`, :class:`NoiseModel`, :class:`ImportanceSample` (:mod:`iwae.protocol`);
- the bound family: :class:`Objective` and its registered classes, :func:`register_objective`,
  :func:`make_objective` (:mod:`iwae.objectives`), the bounds as functions (:mod:`iwae.bounds`);
- the estimators: :func:`estimate`, :func:`backward`, :func:`surrogate_gradients` (:mod:`iwae.estimators`);
- densities to build models from: :func:`gaussian_log_prob`, :func:`bernoulli_log_prob`,
  :func:`standard_normal_log_prob`; Burda's models, :class:`LatentVariableModel` and :class:`ModelConfig`;
- data, training and evaluation: :func:`load_dataset`, :func:`binarize`, :class:`TrainConfig`,
  :func:`build_train_config`, :func:`fit`, :func:`estimate_log_likelihood`, :func:`evaluate_model`;
  the authors' Adam, :class:`BurdaAdam` (:mod:`iwae.optim`).
"""

import importlib

# The public names, imported on first use (PEP 562): ``import iwae`` stays free of torch, so that the command
# line answers ``--help`` and bad input at once and sweep workers that only touch the results store start fast.
_EXPORTS = {
    "BurdaAdam": "iwae.optim",
    "CIWAE": "iwae.objectives",
    "ESTIMATOR_NAMES": "iwae.estimators",
    "Estimator": "iwae.estimators",
    "EstimatorTerms": "iwae.estimators",
    "IWAE": "iwae.objectives",
    "ImportanceSample": "iwae.protocol",
    "LatentVariableModel": "iwae.models",
    "MIWAE": "iwae.objectives",
    "Model": "iwae.protocol",
    "ModelConfig": "iwae.models",
    "NoiseModel": "iwae.protocol",
    "Objective": "iwae.objectives",
    "PIWAE": "iwae.objectives",
    "Power": "iwae.objectives",
    "TrainConfig": "iwae.config",
    "VAE": "iwae.objectives",
    "VR": "iwae.objectives",
    "backward": "iwae.estimators",
    "bernoulli_log_prob": "iwae.models",
    "binarize": "iwae.data",
    "bounds": "iwae.bounds",
    "build_train_config": "iwae.config",
    "estimate": "iwae.estimators",
    "estimate_from_noise": "iwae.estimators",
    "estimate_log_likelihood": "iwae.evaluate",
    "evaluate_model": "iwae.evaluate",
    "fit": "iwae.train",
    "fit_runs": "iwae.train",
    "gaussian_log_prob": "iwae.models",
    "load_dataset": "iwae.data",
    "make_objective": "iwae.objectives",
    "objective_names": "iwae.objectives",
    "register_estimator": "iwae.estimators",
    "register_objective": "iwae.objectives",
    "standard_normal_log_prob": "iwae.models",
    "surrogate_gradients": "iwae.estimators",
}


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'iwae' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"iwae.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "CIWAE",
    "ESTIMATOR_NAMES",
    "IWAE",
    "MIWAE",
    "PIWAE",
    "VAE",
    "VR",
    "BurdaAdam",
    "Estimator",
    "EstimatorTerms",
    "ImportanceSample",
    "LatentVariableModel",
    "Model",
    "ModelConfig",
    "NoiseModel",
    "Objective",
    "Power",
    "TrainConfig",
    "backward",
    "bernoulli_log_prob",
    "binarize",
    "bounds",
    "build_train_config",
    "estimate",
    "estimate_from_noise",
    "estimate_log_likelihood",
    "evaluate_model",
    "fit",
    "fit_runs",
    "gaussian_log_prob",
    "load_dataset",
    "make_objective",
    "objective_names",
    "register_estimator",
    "register_objective",
    "standard_normal_log_prob",
    "surrogate_gradients",
]
