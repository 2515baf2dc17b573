"""A plain PyTorch Elman RNN stack, step by step: the tests' oracle.

It takes the arguments of torch.ops.fastrnn.rnn_forward and returns its first
two outputs, so the fused op and this loop can be compared on anything,
including lengths and dropout masks that nn.RNN cannot be handed directly.
"""

import torch


def rnn_reference(input, hx, weights, lengths=None, dropout_mask=None, num_layers=1,
                  bidirectional=False, has_biases=True, relu=False):
    """input (T, N, C), hx (L*D, N, H) -> output (T, N, D*H), h_n (L*D, N, H)."""
    T = input.shape[0]
    D = 2 if bidirectional else 1
    per_cell = 4 if has_biases else 2
    act = torch.relu if relu else torch.tanh
    layer_in, h_n = input, []
    for layer in range(num_layers):
        if layer > 0 and dropout_mask is not None:
            layer_in = layer_in * dropout_mask[layer - 1]
        outputs = []
        for d in range(D):
            w_ih, w_hh, *biases = weights[(layer * D + d) * per_cell:(layer * D + d + 1) * per_cell]
            h = hx[layer * D + d]
            ys = [None] * T
            for t in (range(T) if d == 0 else reversed(range(T))):
                z = layer_in[t] @ w_ih.T + h @ w_hh.T
                if has_biases:
                    z = z + biases[0] + biases[1]
                h_new = act(z)
                if lengths is None:
                    h = ys[t] = h_new
                else:
                    active = (t < lengths).unsqueeze(1)
                    ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
                    h = torch.where(active, h_new, h)
            outputs.append(torch.stack(ys) if T else layer_in.new_zeros(0, hx.shape[1], hx.shape[2]))
            h_n.append(h)
        layer_in = torch.cat(outputs, dim=2)
    return layer_in, torch.stack(h_n)
