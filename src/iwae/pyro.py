"""The bound family and its estimators for any Pyro model and guide: :class:`IWAE_ELBO`, an ELBO that
``pyro.infer.SVI`` accepts.

Shape convention: samples first. One draw gives log-weights ``[k, batch]``: k particles (vectorised, in a plate
left of the model's own) for each data point, a data point being one index of the data plates (below).

``IWAE_ELBO(num_particles=k, estimator=..., objective=...)`` trains a Pyro model and guide with any registered
objective of :mod:`iwae.objectives` (IWAE by default; Burda et al. 2016) and any registered estimator of
:mod:`iwae.estimators`: ``standard``, ``stl`` (Roeder et al. 2017) or ``dreg`` (Tucker et al. 2019). It holds no
bound and no estimator of its own: it forms the log-weights, asks the estimator for the loss's gradients in them
(:meth:`iwae.estimators.Estimator.log_weight_gradients`) and pushes those back through the model and guide.

**Per data point.** The data plates are the plates that every sample site sits in (model and guide, latent and
observed). Each index of them gets its own log-weight ``log p(x_b, z_b) - log q(z_b | x_b)``, summing the sites'
log-densities over every other plate; the bound is the sum over the data plates of the per-point bounds, times the
scale Pyro gives a subsampled plate (``size / subsample_size``, and any ``poutine.scale``), which must be the same
for every site. Each of these raises a one-line ``ValueError``: a latent site outside a plate that holds every
observed site and other latents (a global latent), a guide site without ``rsample``, a latent in the model but not
in the guide or the reverse, sites with different scales.

**DReG and STL without detaching a distribution.** Those estimators need ``log q`` with q's parameters stopped
while the samples keep their path derivative, and a torch ``Distribution`` cannot be detached from its parameters
(the obstacle of pyro-ppl/pyro issue #2598). Instead, each draw is evaluated twice:

1. the guide runs and draws ``z = T(eps; phi)`` with ``rsample`` (its path to the parameters kept);
2. the guide and the model run again at leaf copies ``z'`` of those values (``poutine.replay``), giving
   ``log q(z')`` and ``log p(x, z')`` as functions of the parameters and of ``z'``.

With ``G_dec`` and ``G_enc``, the loss's gradients in the log-weights that the estimator gives for the model's
parameters and for the samples, the surrogate whose gradient is the estimator's is::

    sum G_dec * log p(x, z')                                # the model's parameters, directly
    + sum_sites < stop(d/dz' sum G_enc * log w(z')), z >    # the path, through every rsample
    - sum G_enc * log q(z')                                 # the score term: the standard estimator only

The gradient with respect to the leaves is a partial derivative at fixed parameters, so for a hierarchical guide
the dependence of ``q(z2 | z1)`` on ``z1`` is part of it, and ``< ., z >`` carries it back through ``z1``'s own
path: only q's parameters are stopped. The replay needs a guide that is a function of its sample sites alone (no
dropout in training mode) and transforms that invert any value: where the replayed ``log q`` differs from the
draw's, or a transform can only invert its own outputs (Planar, Radial flows), a one-line ``ValueError`` says so.
Cost per step: for STL and DReG the guide and the model run twice and the replayed graph is differentiated twice
(for the leaves, then for the parameters). Where one target serves every parameter and nothing is stopped (the
standard estimator of every objective but PIWAE) there is no replay: the gradient of ``sum G log w`` through the
draw's own graph is the estimator's, and each runs once.

Pyro is an optional dependency (``pip install 'iwae[pyro]'``); nothing else in ``iwae`` imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iwae.bounds import LogMeanExpAccumulator
from iwae.estimators import Estimator, get_estimator
from iwae.objectives import Objective, as_objective

try:
    import pyro
    from pyro import poutine
    from pyro.distributions.util import scale_and_mask
    from pyro.infer import ELBO
    from pyro.poutine.indep_messenger import CondIndepStackFrame
    from pyro.poutine.util import site_is_factor, site_is_subsample
    from pyro.util import warn_if_nan
except ImportError as error:  # the optional extra
    raise ImportError("iwae.pyro needs Pyro: pip install 'iwae[pyro]'") from error

PARTICLES = "iwae_particles"  # the name of the plate that vectorises the k particles
_SCALE_RTOL = 1e-12  # sites' scales are products of the same plate ratios: they agree to rounding or not at all
# A guide replayed at its own samples runs the same operations on the same values: its log q agrees to rounding
# (float32), or the guide has randomness of its own.
_REPLAY_RTOL, _REPLAY_ATOL = 1e-5, 1e-4


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().strip("'\"").splitlines()
    return lines[0] if lines else type(error).__name__


@dataclass(frozen=True)
class _Draw:
    """One draw of k particles for every data point: the log-densities ``[k, batch]`` and the common scale."""

    log_p: Tensor  # log p(x, z), summed over the sites and every plate but the data plates
    log_q: Tensor  # log q(z | x), likewise
    scale: float  # the scale of every site (a subsampled data plate's size / subsample_size, poutine.scale)

    @property
    def log_w(self) -> Tensor:
        return self.log_p - self.log_q


def _is_deterministic(site: dict[str, Any]) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _sample_sites(trace: poutine.Trace) -> dict[str, dict[str, Any]]:
    """The trace's sample sites that carry a density: no subsample indices, no ``pyro.deterministic``."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site) and not _is_deterministic(site)
    }


def _guide_latents(guide_trace: poutine.Trace) -> dict[str, dict[str, Any]]:
    """The guide's latent sites; raises ``ValueError`` for one that has no ``rsample`` or that observes data."""
    latents = {}
    for name, site in _sample_sites(guide_trace).items():
        if site["is_observed"]:
            if site_is_factor(site):
                continue  # a pyro.factor in the guide: part of log q, no value of its own
            raise ValueError(f"the guide observes site {name!r}: only the model observes data")
        if not site["fn"].has_rsample:
            raise ValueError(
                f"guide site {name!r} is not reparameterisable ({type(site['fn']).__name__} has no rsample): "
                "IWAE_ELBO's estimators are all reparameterised; use a continuous guide for it"
            )
        latents[name] = site
    return latents


def _check_match(model_sites: dict[str, dict[str, Any]], guide_sites: dict[str, dict[str, Any]]) -> None:
    """One-line ``ValueError`` where the model's latent sites and the guide's differ."""
    for name, site in model_sites.items():
        if not site["is_observed"] and name not in guide_sites:
            raise ValueError(
                f"the model samples site {name!r} but the guide does not: give the guide a reparameterised site "
                f"{name!r} (IWAE_ELBO does not enumerate discrete latents)"
            )
    for name, site in guide_sites.items():
        if site["is_observed"] or site["infer"].get("is_auxiliary", False):
            continue
        if name not in model_sites:
            raise ValueError(
                f"the guide samples site {name!r} but the model does not: rename it to a latent of the model, or "
                "mark it infer={'is_auxiliary': True}"
            )
        if model_sites[name]["is_observed"]:
            raise ValueError(
                f"the model observes site {name!r}, which the guide samples: the guide samples latents only"
            )


def _plates(site: dict[str, Any]) -> set[str]:
    return {frame.name for frame in site["cond_indep_stack"] if frame.name != PARTICLES}


def _data_plates(
    sites: list[dict[str, Any]], observed: list[dict[str, Any]], latents: list[dict[str, Any]]
) -> list[CondIndepStackFrame]:
    """The data plates' frames (every sample site's plates), sorted by dim; checks there is no global latent.

    A latent is global if it sits outside a plate P that holds every observed site and some latent, unless P is
    nested in another such plate (every site in P is in it too: a plate of pixels inside a plate of images).
    """
    plate_sets = [_plates(site) for site in sites]
    held = {name: [i for i, plates in enumerate(plate_sets) if name in plates] for name in set().union(*plate_sets)}

    def nested(inner: str, outer: str) -> bool:
        return set(held[inner]) <= set(held[outer])

    observed_plates = set.intersection(*(_plates(site) for site in observed)) if observed else set()
    candidates = {name for name in observed_plates if any(name in _plates(site) for site in latents)}
    outermost = sorted(
        name for name in candidates if not any(nested(name, q) and not nested(q, name) for q in candidates - {name})
    )
    for plate in outermost:
        for site in latents:
            if plate not in _plates(site):
                raise ValueError(
                    f"latent site {site['name']!r} sits outside plate {plate!r}, which holds every observed site: "
                    "IWAE_ELBO forms one importance weight per data point and cannot share a latent across them; "
                    "move it into the plate or make it a pyro.param"
                )
    common = set.intersection(*plate_sets) if plate_sets else set()
    frames = {frame.name: frame for site in sites for frame in site["cond_indep_stack"] if frame.name in common}
    for name, frame in frames.items():
        if not frame.vectorized:
            raise ValueError(
                f"the data plate {name!r} is sequential (for i in pyro.plate(...)): IWAE_ELBO needs it vectorised "
                f"(with pyro.plate({name!r}, ...))"
            )
    return sorted(frames.values(), key=lambda frame: frame.dim)


def _site_scale(site: dict[str, Any]) -> float:
    """The site's scale as a number; a ``ValueError`` for a tensor of several (a scale per data point)."""
    scale = site["scale"]
    if isinstance(scale, Tensor) and scale.numel() != 1:
        raise ValueError(
            f"site {site['name']!r} has a tensor scale of shape {tuple(scale.shape)}: IWAE_ELBO takes one number "
            "per site (poutine.scale with a float)"
        )
    return float(scale)


class IWAE_ELBO(ELBO):  # Pyro's naming: Trace_ELBO, RenyiELBO
    """The importance-weighted bound family for a Pyro model and guide, with the library's estimators.

    ``pyro.infer.SVI(model, guide, optim, loss=IWAE_ELBO(num_particles=50, estimator="dreg"))`` ascends the
    objective's bound; :meth:`loss` is the negative bound and :meth:`loss_and_grads` also accumulates the
    estimator's gradients into the parameters' ``.grad``, as Pyro's own ELBOs do. The particles are vectorised.
    See the module's docstring for what a data point is and how DReG and STL stop q's parameters only.

    Args:
        num_particles: k, the samples drawn per data point (>= 1).
        estimator: a registered estimator's name (``standard``, ``stl``, ``dreg``) or an
            :class:`~iwae.estimators.Estimator`.
        objective: a registered objective: an :class:`~iwae.objectives.Objective` (``MIWAE(M=5)``), a name
            (``"iwae"``, ``"vae"``, ``"piwae"``, ...) or ``{"name": ..., <parameters>}``.
        max_plate_nesting: how many plates the model and guide nest (the particles take the dim left of them);
            ``None`` guesses it by running the guide and the model once, as Pyro's ELBOs do.

    Raises:
        ValueError: a k below 1, an unknown estimator or objective, an objective whose parameters do not fit k,
            or an estimator that does not apply to the objective.
    """

    def __init__(
        self,
        num_particles: int,
        estimator: str | Estimator = "standard",
        objective: Objective | str | dict[str, Any] = "iwae",
        max_plate_nesting: int | None = None,
    ):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles (k) must be a whole number >= 1, got {num_particles!r}")
        if max_plate_nesting is not None and (
            isinstance(max_plate_nesting, bool) or not isinstance(max_plate_nesting, int) or max_plate_nesting < 0
        ):
            raise ValueError(f"max_plate_nesting must be None or a whole number >= 0, got {max_plate_nesting!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
            vectorize_particles=False,  # this class vectorises the particles itself, for every k
        )
        self.estimator = get_estimator(estimator)
        self.objective = as_objective(objective)
        self.objective.check(num_particles)
        try:  # an estimator that does not apply to the objective fails here, not at the first step
            self.estimator.log_weight_gradients(self.objective, torch.zeros(num_particles, 1, dtype=torch.float64))
        except NotImplementedError as error:
            raise ValueError(
                f"the {self.estimator.name} estimator does not apply to the {self.objective.label()} objective "
                f"({error}); choose another estimator"
            ) from None

    # -- what SVI calls ----------------------------------------------------------------------------------------
    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negative bound (the objective's reported bound, summed over the data points and scaled): a float."""
        with torch.no_grad():
            draw = self._draw(model, guide, args, kwargs, leaves=False)[0]
            loss = -draw.scale * self.objective.decoder_target(draw.log_w).sum().item()
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """:meth:`loss`, and the estimator's gradients of it accumulated into the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:  # else no parameter enters the model or the guide: nothing to accumulate
            loss.backward()
        warn_if_nan(loss, "loss")
        return loss.item()

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        """The loss as a scalar tensor whose gradient is the estimator's (for ``torch.optim`` or Pyro's
        ``ELBOModule``). For STL and DReG that gradient is not the derivative of the value: it drops or rewrites
        the score term, which is the point of them."""
        draw, samples, _, drawn = self._draw(model, guide, args, kwargs, leaves=False)
        batch = draw.log_w.shape[1]
        decoder, encoder, bound = self.estimator.log_weight_gradients(self.objective, draw.log_w.detach())
        factor = draw.scale * batch  # the library's loss is -mean over the batch; this one -scale * sum
        decoder, encoder = decoder * factor, encoder * factor
        loss = -draw.scale * bound.sum()
        if not self.estimator.stop_q_params and torch.equal(decoder, encoder):
            # One target for every parameter, nothing stopped: the gradient of sum G log w through this draw's own
            # graph is the estimator's. No replay, so a guide with randomness of its own (dropout) is fine here.
            surrogate = (encoder * draw.log_w).sum()
            return loss + (surrogate - surrogate.detach())
        try:
            replayed, samples, leaves, _ = self._draw(model, guide, args, kwargs, leaves=True, guide_trace=drawn)
        except KeyError as error:  # a transform that inverts only values it made itself (Planar, Radial flows)
            if "cache" not in str(error):
                raise
            raise ValueError(
                f"the guide cannot evaluate log q at a copy of its own samples ({_first_line(error)}): the "
                f"{self.estimator.name} estimator needs transforms that invert any value; use the standard "
                "estimator with this guide"
            ) from None
        if not torch.allclose(replayed.log_q, draw.log_q.detach(), rtol=_REPLAY_RTOL, atol=_REPLAY_ATOL):
            raise ValueError(
                f"the guide gave another log q when replayed at its own samples, so the {self.estimator.name} "
                "estimator cannot stop q's parameters: make the guide a function of its sample sites alone "
                "(an encoder with dropout: call .eval() on it), or use the standard estimator"
            )
        draw, log_w = replayed, replayed.log_w
        surrogate = (decoder * draw.log_p).sum()
        if leaves:  # the path: d(sum G_enc log w)/dz' at fixed parameters, pushed back through the samples
            names = list(leaves)
            leaf_grads = torch.autograd.grad(
                (encoder * log_w).sum(), [leaves[n] for n in names], retain_graph=True, allow_unused=True
            )
            for name, grad in zip(names, leaf_grads, strict=True):
                if grad is not None:
                    surrogate = surrogate + (grad * samples[name]).sum()
        if not self.estimator.stop_q_params:
            surrogate = surrogate - (encoder * draw.log_q).sum()
        return loss + (surrogate - surrogate.detach())

    # -- evaluation --------------------------------------------------------------------------------------------
    def log_weights(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        """One draw's log-weights ``log p(x_b, z_ib) - log q(z_ib | x_b)``, ``[k, batch]``, detached and unscaled."""
        with torch.no_grad():
            return self._draw(model, guide, args, kwargs, leaves=False)[0].log_w

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple:
        """Pyro's hook for one draw: the model's and the guide's traces, k particles vectorised."""
        self._ensure_plate_nesting(model, guide, args, kwargs)
        guide_trace = poutine.trace(self._vectorised(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(self._vectorised(model), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        return model_trace, guide_trace

    # -- one draw ----------------------------------------------------------------------------------------------
    def _vectorised(self, fn: Callable) -> Callable:
        dim = -int(self.max_plate_nesting) - 1

        def with_particles(*args: Any, **kwargs: Any) -> Any:
            with pyro.plate(PARTICLES, self.num_particles, dim=dim):
                return fn(*args, **kwargs)

        return with_particles

    def _ensure_plate_nesting(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> None:
        """Guess ``max_plate_nesting`` from one run of the guide and the model, once (unless it was given)."""
        if self.max_plate_nesting != float("inf"):
            return
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        dims = [
            frame.dim
            for trace in (guide_trace, model_trace)
            for site in _sample_sites(trace).values()
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ]
        self.max_plate_nesting = -min(dims) if dims else 0

    def _draw(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        leaves: bool,
        guide_trace: poutine.Trace | None = None,
    ) -> tuple[_Draw, dict[str, Tensor], dict[str, Tensor], poutine.Trace]:
        """Draw k particles (or take those of ``guide_trace``, a trace this method returned) and evaluate the
        log-densities; with ``leaves``, evaluate them at leaf copies of the samples (the guide and the model replayed
        there). Returns the draw, the samples and the leaves by site, and the guide's trace of the draw."""
        self._ensure_plate_nesting(model, guide, args, kwargs)
        if guide_trace is None:
            guide_trace = poutine.trace(self._vectorised(guide)).get_trace(*args, **kwargs)
        drawn = guide_trace
        latents = _guide_latents(guide_trace)
        samples = {name: site["value"] for name, site in latents.items()}
        leaf_values: dict[str, Tensor] = {}
        if leaves:
            leaf_values = {name: value.detach().requires_grad_() for name, value in samples.items()}
            replayed = poutine.Trace()
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample":  # what replay reads: the sample sites, the leaves in place of latents
                    replayed.add_node(name, **{**site, "value": leaf_values.get(name, site["value"])})
            guide_trace = poutine.trace(poutine.replay(self._vectorised(guide), trace=replayed)).get_trace(
                *args, **kwargs
            )
            latents = _guide_latents(guide_trace)
        model_trace = poutine.trace(poutine.replay(self._vectorised(model), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
        _check_match(model_sites, guide_sites)
        observed = [site for site in model_sites.values() if site["is_observed"]]
        model_latents = [site for site in model_sites.values() if not site["is_observed"]]
        all_sites = [*model_sites.values(), *guide_sites.values()]
        frames = _data_plates(all_sites, observed, [*model_latents, *latents.values()])
        parts = (("model", model_sites.values()), ("guide", guide_sites.values()))
        scales = [(f"{part} site {site['name']!r}", _site_scale(site)) for part, sites in parts for site in sites]
        first, scale = scales[0] if scales else ("", 1.0)
        for where, value in scales:
            if not math.isclose(value, scale, rel_tol=_SCALE_RTOL):
                raise ValueError(
                    f"sites have different scales ({first}: {scale:g}, {where}: {value:g}): an importance weight "
                    "takes every site at one scale; subsample the data plate only and poutine.scale the model and "
                    "guide as a whole"
                )
        log_p = self._per_point(model_sites.values(), frames)
        log_q = self._per_point(guide_sites.values(), frames)
        if log_p is None or log_q is None:  # a side without a density (a guide with no latents): log 0 = 0 there
            shape = (self.num_particles, math.prod(frame.size for frame in frames))
            other = log_q if log_p is None else log_p
            zeros = torch.zeros(shape) if other is None else torch.zeros_like(other)
            log_p, log_q = (zeros if log_p is None else log_p), (zeros if log_q is None else log_q)
        return _Draw(log_p, log_q, scale), samples, leaf_values, drawn

    def _per_point(self, sites: Iterable[dict[str, Any]], frames: list[CondIndepStackFrame]) -> Tensor | None:
        """The sites' log-densities summed over every plate but the particles and the data plates: ``[k, batch]``
        (None: no site has a density)."""
        n = int(self.max_plate_nesting) + 1  # the model's plates and the particles' on their left
        sizes = [frame.size for frame in frames]
        keep = {-n, *(frame.dim for frame in frames)}
        total: Tensor | None = None
        for site in sites:
            log_prob = scale_and_mask(site["fn"].log_prob(site["value"]), 1.0, site["mask"])
            if not isinstance(log_prob, Tensor):
                continue
            if log_prob.dim() > n:
                raise ValueError(
                    f"site {site['name']!r} has batch shape {tuple(log_prob.shape)}, more dims than its plates allow "
                    f"({n - 1}): declare event dims with .to_event(), or pass a larger max_plate_nesting"
                )
            log_prob = log_prob.reshape((1,) * (n - log_prob.dim()) + tuple(log_prob.shape))
            declared = {frame.dim for frame in site["cond_indep_stack"] if frame.vectorized}
            for i, size in enumerate(log_prob.shape):
                if size != 1 and i - n not in declared:
                    raise ValueError(
                        f"site {site['name']!r} has a batch dim {i - n} of size {size} that no plate declares: "
                        "declare event dims with .to_event(), or put the site in a plate with that dim"
                    )
            summed = [i for i in range(n) if i - n not in keep]
            if summed:
                log_prob = log_prob.sum(dim=summed)
            log_prob = log_prob.expand(self.num_particles, *sizes)
            total = log_prob if total is None else total + log_prob
        if total is None:  # no site with a density (a guide with no latents)
            return None
        return total.reshape(self.num_particles, -1)


def log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int = 500,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """The IWAE estimate ``L_k`` of ``log p(x_b)`` for each data point, k = ``num_samples``, in float64.

    The samples are drawn ``chunk_size`` at a time (the last chunk takes the rest), their log-mean-exp accumulated
    in float64 (:class:`iwae.bounds.LogMeanExpAccumulator`), so memory stays bounded whatever k is; as Burda et al.
    evaluate with k = 5000. No scale: one estimate per index of the data plates.

    Args:
        model, guide: the Pyro model and guide; ``*args`` and ``**kwargs`` go to both.
        num_samples: k (>= 1).
        chunk_size: the particles drawn at a time (>= 1).
        max_plate_nesting: as :class:`IWAE_ELBO`'s.

    Returns:
        ``[batch]``, float64.
    """
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    accumulator = LogMeanExpAccumulator()
    elbo = IWAE_ELBO(min(chunk_size, num_samples), max_plate_nesting=max_plate_nesting)
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        if k != elbo.num_particles:  # the last chunk: the rest, with the nesting the first guessed
            elbo = IWAE_ELBO(k, max_plate_nesting=int(elbo.max_plate_nesting))
        accumulator.add(elbo.log_weights(model, guide, *args, **kwargs))
        done += k
    return accumulator.result()


__all__ = ["IWAE_ELBO", "PARTICLES", "log_likelihood"]
