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
computes (the input's only with input_grad, the last step's product with
W_hh only with state_grad).
"""

import torch
from torch.utils.flop_counter import register_flop_formula

from ._ops import cell_traits

ops = torch.ops.fastrnn

# The forward op's arguments: cell, input, hx, weights, lengths,
# dropout_mask, num_layers, bidirectional, has_biases, has_projections.
_INPUT, _HX, _WEIGHTS, _LENGTHS, _MASK, _LAYERS = 1, 2, 3, 4, 5, 6
# The backward op's: ..., num_layers at 11, ..., input_grad at 15, state_grad
# at 16.
_BACKWARD_LAYERS, _INPUT_GRAD, _STATE_GRAD = 11, 15, 16


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


def _forward_vmap_rule(info, in_dims, *args):
    B = info.batch_size
    if any(d is not None for d in in_dims[_WEIGHTS]):
        # An ensemble: one stack per member.
        return _one_call_per_member(ops.forward, B, in_dims, args)
    args = list(args)
    # The batch rows sit at dim 1 of input (T, N, C) and of the states
    # (L*D, N, .), dim 0 of lengths (N), dim 2 of dropout masks (L-1, T, N,
    # D*P).
    args[_INPUT] = _fold(args[_INPUT], in_dims[_INPUT], 1, B)
    args[_HX] = [_fold(h, d, 1, B) for h, d in zip(args[_HX], in_dims[_HX])]
    if args[_LENGTHS] is not None:
        args[_LENGTHS] = _fold(args[_LENGTHS], in_dims[_LENGTHS], 0, B)
    if args[_MASK] is not None:
        args[_MASK] = _fold(args[_MASK], in_dims[_MASK], 2, B)
    output, state_n, hidden_states, workspace = ops.forward(*args)
    # output and the final states have their batch rows at dim 1,
    # hidden_states (L-1, T, N, D*P) at 2, workspace (L, D, T, N, Ws) at 3.
    outputs = (_unfold(output, 1, B), [_unfold(h, 1, B) for h in state_n],
               _unfold(hidden_states, 2, B), _unfold(workspace, 3, B))
    return outputs, (1, [1] * len(state_n), 2, 3)


def _backward_vmap_rule(info, in_dims, *args):
    # vmap over the backward op: batched gradients (jacobians by reverse
    # mode, gradcheck's check_batched_grad) and ensembles. The weights'
    # gradients are sums over the rows, so the members cannot share one call.
    return _one_call_per_member(ops.backward, info.batch_size, in_dims, args)


def _stack_flops(cell, input_shape, weight_shapes, num_layers, bidirectional, has_biases, proj):
    """Multiply-adds times two of a stack's forward GEMMs: per layer and
    direction, (T*N, C_l) x (C_l, G*H), then per step (N, P) x (P, G*H) and,
    with projections, (N, H) x (H, P)."""
    T, N = input_shape[0], input_shape[1]
    D = 2 if bidirectional else 1
    per = 2 + (2 if has_biases else 0) + (1 if proj else 0)
    gates = cell_traits(cell).gates
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


def _arg(args, kwargs, i, name, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _forward_flops(*args, out_shape=None, **kwargs):
    cell, input_shape, _, weights = args[:4]
    num_layers, bidirectional, has_biases = args[_LAYERS:_LAYERS + 3]
    proj = bool(_arg(args, kwargs, _LAYERS + 3, "has_projections", False))
    return _stack_flops(cell, input_shape, weights, num_layers, bidirectional, has_biases, proj)


def _backward_flops(*args, out_shape=None, **kwargs):
    cell, input_shape, _, weights = args[:4]
    num_layers, bidirectional, has_biases = args[_BACKWARD_LAYERS:_BACKWARD_LAYERS + 3]
    proj = bool(_arg(args, kwargs, _BACKWARD_LAYERS + 3, "has_projections", False))
    input_grad = _arg(args, kwargs, _INPUT_GRAD, "input_grad", True)
    state_grad = _arg(args, kwargs, _STATE_GRAD, "state_grad", True)
    # Every forward GEMM has two in the backward (one per operand), but the
    # input's of the first layer without input_grad, and without state_grad
    # the initial state's of every layer and direction (each batch row's
    # first step's product with W_hh).
    total = 2 * _stack_flops(cell, input_shape, weights, num_layers, bidirectional, has_biases, proj)
    D = 2 if bidirectional else 1
    per = 2 + (2 if has_biases else 0) + (1 if proj else 0)
    T, N = input_shape[0], input_shape[1]
    if not input_grad:
        for d in range(D):
            GH, C = weights[d * per]
            total -= 2 * T * N * GH * C
    if not state_grad:
        for k in range(num_layers * D):
            GH, P = weights[k * per + 1]
            total -= 2 * N * GH * P
    return total


def register():
    torch.library.register_vmap("fastrnn::forward", _forward_vmap_rule)
    torch.library.register_vmap("fastrnn::backward", _backward_vmap_rule)
    register_flop_formula(ops.forward)(_forward_flops)
    register_flop_formula(ops.backward)(_backward_flops)
