"""The settings of a tiny run of the lab (a 4-unit model, 100 training images, L_4 on 20 test images), shared by the
lab's tests (``tests/lab/``, ``tests/integration/``); imported by name, as ``tests/oracles.py`` is (``tests/`` is on
the path: ``pythonpath`` in pyproject.toml's pytest section)."""

from __future__ import annotations

TINY = {
    "dataset": "mnist",
    "layers": 1,
    "latent_dims": [4],
    "train_limit": 100,
    "valid_k": 2,
    "eval_k": 4,
    "eval_limit": 20,
    "samples": False,
}
