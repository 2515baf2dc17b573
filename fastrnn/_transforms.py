"""What torch's transforms and tools need of the fused ops beyond autograd:
batching rules for torch.vmap, and FLOP formulas for
torch.utils.flop_counter.

vmap. torch.nn's layers have no batching rule. A vmapped dimension over the
input and the initial states (and lengths, dropout masks) is more batch rows
for the same fused kernel: it is folded into N and unfolded from the
outputs. A vmapped dimension over the weights (an ensemble of models) runs
one stack per member. A vmapped backward op runs once per member.

Gradient transforms (torch.func.grad, vjp, jacrev, jacfwd, jvp, hessian) and
forward-mode AD need no rule here: under them the ops run their stack step by
step in differentiable ATen ops (csrc/rnn_autograd.cpp).

FLOPs. The forward op counts what torch.nn's step-by-step implementation
counts for the same work: the input GEMM, the hidden-state GEMM of every
step, and the projection's; the backward op the GEMMs of every gradient it
computes (the input's only with input_grad).
"""

import torch
from torch.utils.flop_counter import register_flop_formula

ops = torch.ops.fastrnn

# Per forward op: the index of weights among its arguments, the gates, and
# where each output has its batch rows (output and final states at dim 1,
# hidden_states (L-1, T, N, D*P) at 2, workspace (L, D, T, N, Ws) at 3).
_OPS = {
    "rnn_forward": (2, 1, (1, 1, 2)),
    "gru_forward": (2, 3, (1, 1, 2, 3)),
    "lstm_forward": (3, 4, (1, 1, 1, 2, 3)),
}
# Per backward op: the index of its weights, of num_layers and of input_grad.
_BACKWARD = {
    "rnn_backward": (2, 9, 13),
    "gru_backward": (2, 10, 13),
    "lstm_backward": (3, 12, 16),
}


def _select(arg, dim, b):
    if isinstance(arg, (list, tuple)):
        return [_select(a, d, b) for a, d in zip(arg, dim)]
    return arg if dim is None else arg.select(dim, b)


def _fold(t, dim, pos, B):
    """t with the vmapped dimension `dim` (None: broadcast to B) moved to
    position `pos` and merged with the one after it (the batch rows)."""
    if dim is None:
        t = t.unsqueeze(pos).expand(*t.shape[:pos], B, *t.shape[pos:])
    else:
        t = t.movedim(dim, pos)
    return t.reshape(*t.shape[:pos], t.shape[pos] * t.shape[pos + 1], *t.shape[pos + 2:])


def _unfold(t, pos, B):
    """The inverse of _fold for an output whose batch rows sit at `pos`."""
    return t.reshape(*t.shape[:pos], B, t.shape[pos] // B, *t.shape[pos + 1:])


def _one_call_per_member(op, B, in_dims, args):
    """op run for each of the B members on its slice of the batched args,
    the outputs (tensors or lists of them) stacked at dim 0."""
    members = [op(*[_select(a, d, b) for a, d in zip(args, in_dims)]) for b in range(B)]
    outputs = []
    for outs in zip(*members):
        if isinstance(outs[0], (list, tuple)):
            outputs.append([torch.stack(ts) for ts in zip(*outs)])
        else:
            outputs.append(torch.stack(outs))
    dims = tuple([0] * len(o) if isinstance(o, list) else 0 for o in outputs)
    return tuple(outputs), dims


def _vmap_rule(name):
    w_index, _, positions = _OPS[name]
    op = getattr(ops, name)

    def rule(info, in_dims, *args):
        B = info.batch_size
        if any(d is not None for d in in_dims[w_index]):
            # An ensemble: one stack per member.
            return _one_call_per_member(op, B, in_dims, args)
        args = list(args)
        # The batch rows sit at dim 1 of input (T, N, C) and of the states
        # (L*D, N, .), dim 0 of lengths (N), dim 2 of dropout masks (L-1, T,
        # N, D*P).
        for i in range(w_index):
            args[i] = _fold(args[i], in_dims[i], 1, B)
        lengths, mask = w_index + 1, w_index + 2
        if args[lengths] is not None:
            args[lengths] = _fold(args[lengths], in_dims[lengths], 0, B)
        if args[mask] is not None:
            args[mask] = _fold(args[mask], in_dims[mask], 2, B)
        outputs = op(*args)
        return tuple(_unfold(t, p, B) for t, p in zip(outputs, positions)), positions

    return rule


def _stack_flops(input_shape, weight_shapes, num_layers, bidirectional, has_biases, gates,
                 proj=False):
    """Multiply-adds times two of a stack's forward GEMMs: per layer and
    direction, (T*N, C_l) x (C_l, G*H), then per step (N, P) x (P, G*H) and,
    with projections, (N, H) x (H, P)."""
    T, N = input_shape[0], input_shape[1]
    D = 2 if bidirectional else 1
    per = 2 + (2 if has_biases else 0) + (1 if proj else 0)
    total = 0
    for k in range(num_layers * D):
        w_ih, w_hh = weight_shapes[k * per], weight_shapes[k * per + 1]
        GH, C_l = w_ih
        P = w_hh[1]
        total += 2 * T * N * GH * (C_l + P)
        if proj:
            H = GH // gates
            total += 2 * T * N * H * P
    return total


def _forward_flops(name):
    w_index, gates, _ = _OPS[name]

    def formula(*args, out_shape=None, **kwargs):
        input_shape, weights = args[0], args[w_index]
        num_layers, bidirectional, has_biases = args[w_index + 3:w_index + 6]
        proj = name == "lstm_forward" and bool(args[w_index + 6])
        return _stack_flops(input_shape, weights, num_layers, bidirectional, has_biases, gates, proj)

    return formula


def _backward_flops(name):
    w_index, flags_at, input_grad_at = _BACKWARD[name]
    gates = _OPS[name.replace("backward", "forward")][1]

    def formula(*args, out_shape=None, **kwargs):
        input_shape, weights = args[0], args[w_index]
        num_layers, bidirectional, has_biases = args[flags_at:flags_at + 3]
        proj = name == "lstm_backward" and bool(args[flags_at + 3])
        input_grad = args[input_grad_at] if len(args) > input_grad_at else kwargs.get("input_grad", True)
        # Every forward GEMM has two in the backward (one per operand), but
        # the input's of the first layer without input_grad.
        total = 2 * _stack_flops(input_shape, weights, num_layers, bidirectional, has_biases,
                                 gates, proj)
        if not input_grad:
            D = 2 if bidirectional else 1
            per = 2 + (2 if has_biases else 0) + (1 if proj else 0)
            T, N = input_shape[0], input_shape[1]
            for d in range(D):
                GH, C = weights[d * per]
                total -= 2 * T * N * GH * C
        return total

    return formula


def _backward_vmap_rule(name):
    # vmap over a backward op: batched gradients (jacobians by reverse mode,
    # gradcheck's check_batched_grad) and ensembles. The weights' gradients
    # are sums over the rows, so the members cannot share one call.
    op = getattr(ops, name)

    def rule(info, in_dims, *args):
        return _one_call_per_member(op, info.batch_size, in_dims, args)

    return rule


def register():
    for name in _OPS:
        torch.library.register_vmap(f"fastrnn::{name}", _vmap_rule(name))
        register_flop_formula(getattr(ops, name))(_forward_flops(name))
    for name in _BACKWARD:
        torch.library.register_vmap(f"fastrnn::{name}", _backward_vmap_rule(name))
    for name in _BACKWARD:
        register_flop_formula(getattr(ops, name))(_backward_flops(name))
