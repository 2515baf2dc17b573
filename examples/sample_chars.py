"""Greedy sampling from a character model whose decoder is an nn.LSTMCell
driven one step at a time by a loop of its own, as samplers, beam search and
attention decoders drive a cell. The model is trained briefly, then samples
with torch.nn's cell and, after fastrnn.replace_rnn, with fastrnn's; both
samples, the largest difference between the two models' logits over the
same text and the time per sampled character are printed.

    python examples/sample_chars.py [--iters 150] [--length 120] [--backend fused]
"""

import argparse
import time

import torch
from torch import nn

import fastrnn

TEXT = "the quick brown fox jumps over the lazy dog. " * 8
VOCAB = sorted(set(TEXT))


class CharModel(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), 16)
        self.cell = nn.LSTMCell(16, hidden)
        self.head = nn.Linear(hidden, len(VOCAB))

    def step(self, idx, hx=None):
        """Logits of the next character and the new state (h, c)."""
        h, c = self.cell(self.embed(idx), hx)
        return self.head(h), (h, c)

    def logits(self, idx):
        """Teacher-forced logits over idx (N, T): (T, N, vocab)."""
        hx, out = None, []
        for t in range(idx.shape[1]):
            y, hx = self.step(idx[:, t], hx)
            out.append(y)
        return torch.stack(out)


def encode(text):
    return torch.tensor([VOCAB.index(ch) for ch in text])


def train(model, iters, window=24, batch=16):
    data = encode(TEXT)
    generator = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(iters):
        starts = torch.randint(0, len(data) - window - 1, (batch,), generator=generator)
        chunk = torch.stack([data[s:s + window + 1] for s in starts.tolist()])
        logits = model.logits(chunk[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(VOCAB)), chunk[:, 1:].T.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def sample(model, prompt, length):
    """Greedy continuation of prompt; the seconds per sampled character."""
    idx = encode(prompt).unsqueeze(0)
    y, hx = None, None
    for t in range(idx.shape[1]):
        y, hx = model.step(idx[:, t], hx)
    out = []
    start = time.perf_counter()
    for _ in range(length):
        nxt = y.argmax(-1)
        out.append(VOCAB[nxt.item()])
        y, hx = model.step(nxt, hx)
    return prompt + "".join(out), (time.perf_counter() - start) / length


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--length", type=int, default=120)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--backend", default="fused", choices=fastrnn.backend.BACKENDS)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = CharModel(args.hidden)
    losses = train(model, args.iters)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.iters} steps")
    check = encode(TEXT[:60]).unsqueeze(0)
    with torch.no_grad():
        expected = model.logits(check)
    text_nn, per_nn = sample(model, "the ", args.length)

    fastrnn.replace_rnn(model, backend=args.backend)
    with torch.no_grad():
        diff = (model.logits(check) - expected).abs().max().item()
    text_ours, per_ours = sample(model, "the ", args.length)
    print(f"nn.LSTMCell:      {text_nn!r}")
    print(f"fastrnn.LSTMCell: {text_ours!r} (ran {model.cell.last_path})")
    print(f"largest logit difference over the same text: {diff:.2e}")
    print(f"time a character: nn {per_nn * 1e6:.0f} us, fastrnn {per_ours * 1e6:.0f} us")
    return losses, text_nn, text_ours, diff, model


if __name__ == "__main__":
    main()
