"""Next-step prediction of noisy sine waves, trained with a torch.nn layer
and, from the same seed, with that model after fastrnn.replace_rnn; prints
both loss curves and the time taken.

    python examples/train_sine.py [--cell rnn|lstm|gru] [--epochs 30] [--backend fused]
"""

import argparse
import math
import time

import torch
from torch import nn

import fastrnn


def make_data(n, steps, generator):
    """Sine waves of random frequency and phase plus noise: (n, steps + 1, 1)."""
    t = torch.arange(steps + 1, dtype=torch.float32)
    freq = 0.05 + 0.25 * torch.rand(n, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    clean = torch.sin(freq * t + phase)
    return (clean + 0.05 * torch.randn(clean.shape, generator=generator)).unsqueeze(-1)


LAYERS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class Predictor(nn.Module):
    def __init__(self, cell, hidden):
        super().__init__()
        self.rnn = LAYERS[cell](1, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y)


def train(data, args, backend=None):
    """Trains the model from args.seed: as built (torch.nn), or with its
    recurrent layer swapped for fastrnn's (same weights) with `backend`."""
    torch.manual_seed(args.seed)
    model = Predictor(args.cell, args.hidden)
    if backend is not None:
        fastrnn.replace_rnn(model, backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    x, target = data[:, :-1], data[:, 1:]
    losses = []
    start = time.perf_counter()
    for _ in range(args.epochs):
        for i in range(0, len(x), args.batch):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[i:i + args.batch]), target[i:i + args.batch])
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses.append(nn.functional.mse_loss(model(x), target).item())
    return losses, time.perf_counter() - start, model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cell", default="rnn", choices=list(LAYERS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="fused", choices=["auto", "fused", "torch"])
    args = p.parse_args(argv)
    data = make_data(args.sequences, args.steps, torch.Generator().manual_seed(args.seed))
    ref, t_ref, _ = train(data, args)
    ours, t_ours, model = train(data, args, backend=args.backend)
    name = LAYERS[args.cell].__name__
    print(f"{'epoch':>5} {'nn.' + name:>10} {'fastrnn':>10}")
    for i, (a, b) in enumerate(zip(ref, ours)):
        print(f"{i + 1:>5} {a:>10.5f} {b:>10.5f}")
    print(f"time: nn.{name} {t_ref:.2f} s, fastrnn.{name} ({args.backend}: {model.rnn.last_path}) "
          f"{t_ours:.2f} s")
    return ref, ours, model


if __name__ == "__main__":
    main()
