"""A Pyro VAE on MNIST trained with IWAE-DReG (iwae.pyro.IWAE_ELBO in pyro.infer.SVI), evaluated with L_5000.

    python examples/pyro_vae.py                    # the defaults below: about a minute of training on one core
    python examples/pyro_vae.py --measure          # also the DReG/standard gradient variance and RenyiELBO checks

Burda et al.'s one-layer architecture (50 latent units, two tanh layers of 200 each way, Bernoulli pixels) written as
a Pyro model and guide; MNIST as the package ships it, binarised afresh at each step. The defaults are a small
budget (``--train-limit 10000`` images, one epoch, k = 50, minibatches of 20) whose L_5000 is far from Burda's
converged numbers. With ``--measure`` the script also reports, at the trained parameters, the variance of the
guide's gradients under DReG and under the standard estimator over repeated draws on one minibatch, and the
largest difference between IWAE_ELBO's loss and ``pyro.infer.RenyiELBO(alpha=0)``'s on the same draws.
Prints one JSON line.
"""

import argparse
import json
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import iwae
import iwae.pyro


class VAE(nn.Module):
    """Burda et al.'s one-layer VAE; :meth:`model` and :meth:`guide` are its Pyro programs, ``x`` ``[batch, 784]``."""

    def __init__(self, latent: int = 50, hidden: int = 200):
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(
            nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 784)
        )

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            mean, log_std = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(mean, log_std.exp()).to_event(1))


def gradient_variances(vae, x, k, repeats, generator_seed):
    """The guide's gradients' total variance (summed over its parameters) under each estimator, ``repeats`` draws of
    k particles on the minibatch ``x``, seeds shared between the estimators."""
    params = list(vae.encoder.parameters())
    totals = {}
    for estimator in ("standard", "dreg"):
        elbo = iwae.pyro.IWAE_ELBO(k, estimator=estimator, max_plate_nesting=1)
        draws = []
        for repeat in range(repeats):
            for param in params:
                param.grad = None
            pyro.set_rng_seed(generator_seed + repeat)
            elbo.loss_and_grads(vae.model, vae.guide, x)
            draws.append(torch.cat([param.grad.flatten() for param in params]))
        totals[estimator] = torch.stack(draws).double().var(dim=0).sum().item()
    for param in vae.parameters():
        param.grad = None
    return totals


def renyi_agreement(vae, x, k, seeds):
    """The largest |IWAE_ELBO loss - RenyiELBO(alpha=0) loss| over ``seeds`` draws of the same seed, and the loss."""
    ours = iwae.pyro.IWAE_ELBO(k, max_plate_nesting=1)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    largest, loss = 0.0, 0.0
    for seed in range(seeds):
        pyro.set_rng_seed(seed)
        loss = ours.loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(seed)
        largest = max(largest, abs(loss - renyi.loss(vae.model, vae.guide, x)))
    return largest, loss


def step_milliseconds(vae, x, k, repeats=25):
    """Median milliseconds of one ``loss_and_grads`` on ``x`` for IWAE_ELBO's standard and DReG estimators and for
    RenyiELBO(alpha=0), the three alternated so that a busy machine slows each alike."""
    losses = {
        "standard": iwae.pyro.IWAE_ELBO(k, estimator="standard", max_plate_nesting=1),
        "dreg": iwae.pyro.IWAE_ELBO(k, estimator="dreg", max_plate_nesting=1),
        "renyi": pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1),
    }
    times = {name: [] for name in losses}
    for repeat in range(repeats + 3):  # the first 3: warm-up
        for name, loss in losses.items():
            for param in vae.parameters():
                param.grad = None
            start = time.perf_counter()
            loss.loss_and_grads(vae.model, vae.guide, x)
            if repeat >= 3:
                times[name].append(1000 * (time.perf_counter() - start))
    for param in vae.parameters():
        param.grad = None
    return {name: round(statistics.median(values), 1) for name, values in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="where MNIST is (default: the copy inside the package)")
    parser.add_argument("--k", type=int, default=50, help="particles per image in training (default 50)")
    parser.add_argument("--estimator", default="dreg", choices=iwae.ESTIMATOR_NAMES, help="(default dreg)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training images (default 1)")
    parser.add_argument("--train-limit", type=int, default=10000, help="training images (default 10000)")
    parser.add_argument("--batch-size", type=int, default=20, help="(default 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    parser.add_argument("--test-limit", type=int, default=200, help="test images for L_5000 (default 200)")
    parser.add_argument("--eval-k", type=int, default=5000, help="samples per test image (default 5000)")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (default 1)")
    parser.add_argument("--measure", action="store_true",
                        help="gradient variance ratio, RenyiELBO agreement and milliseconds per loss_and_grads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    data = iwae.load_dataset("mnist", args.data_dir, progress=False)
    train = data.train.subset(args.train_limit)
    generator = torch.Generator().manual_seed(0)  # the binarisation's
    vae = VAE()
    elbo = iwae.pyro.IWAE_ELBO(num_particles=args.k, estimator=args.estimator, max_plate_nesting=1)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}), loss=elbo)
    start = time.perf_counter()
    steps, losses = 0, []
    for _ in range(args.epochs):
        order = torch.randperm(len(train), generator=generator)
        for batch in order.split(args.batch_size):
            losses.append(svi.step(iwae.binarize(train.images[batch], data.binarization, generator)))
            steps += 1
    train_seconds = time.perf_counter() - start
    test = iwae.binarize(data.test.subset(args.test_limit).images, data.binarization, torch.Generator().manual_seed(1))
    start = time.perf_counter()
    with torch.no_grad():
        log_lik = torch.cat([
            iwae.pyro.log_likelihood(vae.model, vae.guide, chunk, num_samples=args.eval_k, max_plate_nesting=1)
            for chunk in test.split(50)
        ])  # fmt: skip
    result = {
        "test_nll": -log_lik.mean().item(),
        "eval_k": args.eval_k,
        "n_test": len(test),
        "k": args.k,
        "estimator": args.estimator,
        "epochs": args.epochs,
        "train_images": len(train),
        "steps": steps,
        "last_100_train_loss_per_image": sum(losses[-100:]) / (len(losses[-100:]) * args.batch_size),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
    }
    if args.measure:
        x = iwae.binarize(train.images[: args.batch_size], data.binarization, torch.Generator().manual_seed(2))
        variances = gradient_variances(vae, x, args.k, repeats=100, generator_seed=1000)
        result["guide_gradient_variance"] = variances
        result["variance_ratio_dreg_over_standard"] = variances["dreg"] / variances["standard"]
        largest, loss = renyi_agreement(vae, x, args.k, seeds=10)
        result["renyi_max_abs_diff"] = largest
        result["renyi_loss"] = loss
        result["loss_and_grads_ms"] = step_milliseconds(vae, x, args.k)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
