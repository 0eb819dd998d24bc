"""A VAE written from scratch, independent of the iwae package (PyTorch and the MNIST file only), to tell whether
the collapse of student-full's k = 1 run is this package's fault or the protocol's.

The student study's networks (ReLU 784-200-200-50, Gaussian q with std = exp(linear), Bernoulli p), Glorot-uniform
weights and zero biases, Adam at 1e-3 with PyTorch's defaults, minibatch 128, the loss the minibatch's mean of
-log (1/k) sum_i w_i, dynamic binarisation; 2 passes over the first 10,000 training images. For each seed it trains
twice: the decoder's output bias starting at the logit of the mean training pixel (Burda's start, clipped to
[0.001, 0.999]) and at zero. Prints one JSON line per run, and writes them all to ``--out`` as ``{"runs": [...]}``:
the mean training bound of each pass and the units whose KL(q(u | x) || p(u)), averaged over the last minibatch,
exceeds 0.01.

    OMP_NUM_THREADS=1 python results/student-collapse-check/independent_vae.py --data ../shared/data/mnist \
        --out results/student-collapse-check/independent_vae.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def load_images(folder: Path, count: int) -> torch.Tensor:
    """The first ``count`` MNIST training images as grey levels in [0, 1), ``[count, 784]``."""
    with gzip.open(folder / "train-images-idx3-ubyte.gz") as handle:
        pixels = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 784)
    return torch.tensor(pixels[:count], dtype=torch.float32) / 256.0


def network(n_in: int, n_out: int) -> nn.Sequential:
    layers = nn.Sequential(nn.Linear(n_in, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, n_out))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return layers


def train(images: torch.Tensor, k: int, seed: int, data_mean_start: bool, passes: int) -> dict:
    torch.manual_seed(seed)
    encoder, decoder = network(784, 2 * 50), network(50, 784)
    if data_mean_start:
        mean = images.mean(0).clamp(0.001, 0.999)
        with torch.no_grad():
            decoder[-1].bias.copy_(torch.log(mean) - torch.log1p(-mean))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    bounds = []
    for _ in range(passes):
        order, total = torch.randperm(len(images)), 0.0
        for start in range(0, len(images), 128):
            x = torch.bernoulli(images[order[start : start + 128]])
            mean_z, log_std = encoder(x).chunk(2, dim=-1)
            eps = torch.randn(k, *mean_z.shape)
            z = mean_z + log_std.exp() * eps  # [k, batch, 50]
            log_q = (-0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
            logits = decoder(z)
            log_px = (x * logits - F.softplus(logits)).sum(-1)
            bound = torch.logsumexp(log_px + log_prior - log_q, dim=0) - math.log(k)
            optimizer.zero_grad()
            (-bound.mean()).backward()
            optimizer.step()
            total += bound.sum().item()
        bounds.append(round(total / len(images), 2))
    kl = 0.5 * (mean_z**2 + (2 * log_std).exp() - 1 - 2 * log_std)
    units = int((kl.mean(0) > 0.01).sum())
    start = "data-mean" if data_mean_start else "zero"
    return {"k": k, "seed": seed, "output_bias": start, "bound_per_pass": bounds, "units_kl": units}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--out", type=Path, help="a JSON file for the results (written at the end)")
    args = parser.parse_args()
    images = load_images(args.data, args.images)
    results = []
    for seed in range(args.seeds):
        for data_mean_start in (True, False):
            results.append(train(images, args.k, seed, data_mean_start, args.passes))
            print(json.dumps(results[-1]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
