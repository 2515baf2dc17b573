"""Plain PyTorch Elman, LSTM and GRU stacks, step by step: the tests' oracle.

Each takes the arguments of the matching torch.ops.fastrnn.*_forward op and
returns its output and final states, so the fused ops and these loops can be
compared on anything, including lengths and dropout masks that torch.nn's
layers cannot be handed. They share nothing with the fused implementation.
"""

import torch


def _stack(input, states, weights, lengths, dropout_mask, num_layers, bidirectional, per_cell,
           step):
    """Runs step(x_t, states, cell weights) -> (output, new states) over the
    layers and directions; states is a tuple of (L*D, N, .) tensors."""
    T = input.shape[0]
    D = 2 if bidirectional else 1
    layer_in, finals = input, [[] for _ in states]
    for layer in range(num_layers):
        if layer > 0 and dropout_mask is not None:
            layer_in = layer_in * dropout_mask[layer - 1]
        outputs = []
        for d in range(D):
            k = (layer * D + d) * per_cell
            w = weights[k:k + per_cell]
            s = tuple(st[layer * D + d] for st in states)
            ys = [None] * T
            for t in (range(T) if d == 0 else reversed(range(T))):
                y, s_new = step(layer_in[t], s, w)
                if lengths is None:
                    ys[t], s = y, s_new
                else:
                    active = (t < lengths).unsqueeze(1)
                    ys[t] = torch.where(active, y, torch.zeros_like(y))
                    s = tuple(torch.where(active, a, b) for a, b in zip(s_new, s))
            width = states[0].shape[2]
            outputs.append(torch.stack(ys) if T else layer_in.new_zeros(0, input.shape[1], width))
            for f, st in zip(finals, s):
                f.append(st)
        layer_in = torch.cat(outputs, dim=2)
    return (layer_in, *(torch.stack(f) for f in finals))


def rnn_reference(input, hx, weights, lengths=None, dropout_mask=None, num_layers=1,
                  bidirectional=False, has_biases=True, relu=False):
    """input (T, N, C), hx (L*D, N, H) -> output (T, N, D*H), h_n (L*D, N, H)."""
    act = torch.relu if relu else torch.tanh

    def step(x, s, w):
        z = x @ w[0].T + s[0] @ w[1].T
        if has_biases:
            z = z + w[2] + w[3]
        h = act(z)
        return h, (h,)

    return _stack(input, (hx,), weights, lengths, dropout_mask, num_layers, bidirectional,
                  4 if has_biases else 2, step)


def lstm_reference(input, hx, cx, weights, lengths=None, dropout_mask=None, num_layers=1,
                   bidirectional=False, has_biases=True, has_projections=False):
    """input (T, N, C), hx (L*D, N, P), cx (L*D, N, H) -> output (T, N, D*P),
    h_n (L*D, N, P), c_n (L*D, N, H). Gates i, f, g, o."""

    def step(x, s, w):
        h, c = s
        gates = x @ w[0].T + h @ w[1].T
        if has_biases:
            gates = gates + w[2] + w[3]
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if has_projections:
            h = h @ w[-1].T
        return h, (h, c)

    per_cell = 2 + (2 if has_biases else 0) + (1 if has_projections else 0)
    return _stack(input, (hx, cx), weights, lengths, dropout_mask, num_layers, bidirectional,
                  per_cell, step)


def gru_reference(input, hx, weights, lengths=None, dropout_mask=None, num_layers=1,
                  bidirectional=False, has_biases=True):
    """input (T, N, C), hx (L*D, N, H) -> output (T, N, D*H), h_n (L*D, N, H).
    Gates r, z, n, the reset gate applied to h W_hn^T + b_hn."""

    def step(x, s, w):
        (h,) = s
        gi = x @ w[0].T
        gh = h @ w[1].T
        if has_biases:
            gi, gh = gi + w[2], gh + w[3]
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        h = (1 - z) * n + z * h
        return h, (h,)

    return _stack(input, (hx,), weights, lengths, dropout_mask, num_layers, bidirectional,
                  4 if has_biases else 2, step)
