"""A first look at fastrnn.RNN, step by step, as one would with nn.RNN.

    python examples/walkthrough.py
"""

import torch
from torch import nn

import fastrnn

torch.manual_seed(0)

# A layer: 9 input features, 16 hidden units. backend="fused" runs fastrnn's
# own kernel on CPU as well (the default, "auto", uses it on CUDA only).
rnn = fastrnn.RNN(input_size=9, hidden_size=16, batch_first=True, backend="fused")
print(rnn)

# A batch of 2 sequences of 5 steps. Without h0 the hidden state starts at zero.
x = torch.randn(2, 5, 9)
y, h_n = rnn(x)
print("output", tuple(y.shape), "h_n", tuple(h_n.shape))
y0, h0_n = rnn(x, torch.zeros(1, 2, 16))
assert torch.equal(y, y0) and torch.equal(h_n, h0_n)
print("no h0 is the same as h0 = zeros")

# The last step's output is the final hidden state.
assert torch.equal(y[:, -1], h_n[0])

# Parameters: the same names and sizes as nn.RNN.
for name, p in rnn.named_parameters():
    print(f"  {name:<14} {tuple(p.shape)}")
deep = fastrnn.RNN(9, 16, num_layers=3, backend="fused")
print("three layers:", [(n, tuple(p.shape)) for n, p in deep.named_parameters()])
print("parameters:", sum(p.numel() for p in deep.parameters()))


class RNNnet(nn.Module):
    """An RNN with a linear read-out of every step."""

    def __init__(self, input_size, hidden_size, output_size, **kw):
        super().__init__()
        self.rnn = fastrnn.RNN(input_size, hidden_size, batch_first=True, **kw)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x, h0=None):
        y, h_n = self.rnn(x, h0)
        return self.fc(y), h_n


model = RNNnet(9, 16, 1, backend="fused")
target = torch.randn(2, 5, 1)
pred, _ = model(x)
loss = nn.functional.mse_loss(pred, target)
loss.backward()
print(f"MSE loss {loss.item():.4f}; grad norm of weight_hh_l0 {model.rnn.weight_hh_l0.grad.norm():.4f}")

# Its weights load into nn.RNN and back.
plain = nn.RNN(9, 16, batch_first=True)
plain.load_state_dict(model.rnn.state_dict())
torch.testing.assert_close(plain(x)[0], model.rnn(x)[0])
print("nn.RNN with the same state_dict gives the same output")

# LSTM and GRU the same way: torch.nn's arguments, state conventions and
# parameter names; the LSTM's state is the pair (h, c).
lstm = fastrnn.LSTM(9, 16, num_layers=2, batch_first=True, backend="fused")
y, (h_n, c_n) = lstm(x)
print("LSTM output", tuple(y.shape), "h_n", tuple(h_n.shape), "c_n", tuple(c_n.shape))
gru = fastrnn.GRU(9, 16, bidirectional=True, batch_first=True, backend="fused")
y, h_n = gru(x)
print("GRU output", tuple(y.shape), "h_n", tuple(h_n.shape))

# A model written with torch.nn layers: replace_rnn swaps each for fastrnn's,
# keeping its Parameters, and use_backend chooses the kernels for every
# fastrnn layer inside the block.
net = nn.Sequential(nn.LSTM(9, 16, batch_first=True))
before = net(x)[0]
fastrnn.replace_rnn(net)
with fastrnn.use_backend("fused"):
    after = net(x)[0]
torch.testing.assert_close(after, before)
print(f"replace_rnn: {type(net[0]).__module__}.{type(net[0]).__name__}, ran {net[0].last_path}, "
      "same output as the nn.LSTM it replaced")
