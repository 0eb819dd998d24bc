"""A convolutional VAE on Fashion-MNIST, trained with IWAE and the DReG estimator through iwae's public API.

    python examples/conv_vae.py --data-dir ../shared/data --train-limit 2000 --epochs 1
"""

import argparse
import json

import torch
from torch import nn

import iwae


class ConvVAE(nn.Module):
    """Follows iwae.Model: model(x, k, generator, stop_q_params=...) -> iwae.ImportanceSample, [k, batch] densities."""

    def __init__(self, latent: int = 16):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 2 * latent),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(latent, 64 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)), nn.ConvTranspose2d(64, 32, 4, 2, 1),
            nn.ReLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Flatten(),
        )  # fmt: skip

    def encoder_parameters(self):
        return self.encoder.parameters()

    def decoder_parameters(self):
        return self.decoder.parameters()

    def forward(self, x, k, generator=None, *, stop_q_params=False):
        mean, log_std = self.encoder(x).chunk(2, dim=-1)  # [batch, latent] each
        h = mean + log_std.exp() * torch.randn((k, *mean.shape), generator=generator)  # [k, batch, latent]
        q_mean, q_log_std = (mean.detach(), log_std.detach()) if stop_q_params else (mean, log_std)
        logits = self.decoder(h.flatten(0, 1)).view(k, *x.shape)  # [k, batch, 784]
        return iwae.ImportanceSample(
            latents=[h], log_px_given_h=iwae.bernoulli_log_prob(x, logits),
            log_prior=iwae.standard_normal_log_prob(h), log_q=iwae.gaussian_log_prob(h, q_mean, q_log_std),
        )  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--eval-k", type=int, default=500)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = iwae.load_dataset("fashion-mnist", args.data_dir)
    model, generator = ConvVAE(), torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.epochs):
        for images in data.train.subset(args.train_limit).images.split(20):
            optimizer.zero_grad()
            x = iwae.binarize(images, data.binarization, generator)
            terms = iwae.estimate(model, x, args.k, generator, iwae.IWAE(), "dreg")
            iwae.backward(model, terms)
            optimizer.step()
    with torch.no_grad():
        test = data.test.subset(args.test_limit)
        log_lik = iwae.estimate_log_likelihood(model, test, data.binarization, args.eval_k, generator)["log_lik"]
    result = {"test_nll": -log_lik.mean().item(), "k": args.k, "eval_k": args.eval_k, "n_test": len(test)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
