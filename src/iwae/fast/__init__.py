"""iwae.fast: every CPU speed path, behind one wall.

The core (:mod:`iwae.models`, :mod:`iwae.objectives`, :mod:`iwae.estimators`, :mod:`iwae.evaluate`, ...) is plain
PyTorch and imports nothing from here. The training loop asks :func:`training_path` once per run (the one hook,
in :func:`iwae.steps.choose_step_path`), and this layer serves what it can:

- :mod:`iwae.fast.backprop`: the estimators' gradients by explicit backpropagation, without autograd's graph;
- :mod:`iwae.fast.step` (``step.cpp``): its forward and backward passes in C++, compiled on first use;
- :mod:`iwae.fast.native` (``kernels.c``): C kernels and oneDNN's fused linear layers it uses;
- :mod:`iwae.fast.adam`: the fused Adam kernel called directly;
- :mod:`iwae.fast.forward`: the models' forward pass on these kernels, for evaluation (:func:`for_evaluation`,
  which ``iwae eval`` passes to :func:`iwae.evaluate.evaluate_model`);
- :mod:`iwae.fast.allocator`: glibc's malloc thresholds for the commands that train.

Each is tested against the reference path (autograd over :mod:`iwae.models`). One switch each
(``IWAE_FAST``, :mod:`iwae.fast.switches`); :func:`status` reports them all.
"""

from iwae.fast.forward import for_evaluation
from iwae.fast.plan import gradient_path, status, training_path
from iwae.fast.switches import FEATURES, enabled

__all__ = ["FEATURES", "enabled", "for_evaluation", "gradient_path", "status", "training_path"]
