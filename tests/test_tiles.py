"""The CPU's bfloat16 step products (on AMX tiles, or with AVX512-BF16's
VDPBF16PS where there are none): each step's [x_t | h] rounded to
bfloat16 times [W_ih | W_hh]^T, summed in float32, the cell's step in
float32. Checked against a step-by-step reference of that same
arithmetic in torch (float64 products of the bfloat16 values, float32
state): at least 97% of the layer's bfloat16 outputs must equal it to the
bit and none be more than 8 units of bfloat16's spacing away, and the
float32 products (h not rounded) must differ from the tiles' in more than
3% of the values. Skipped where the processor has neither AMX-BF16 nor
AVX512-BF16."""

import pytest
import torch
from torch import nn

import fastrnn
from helpers import pair

TILES = pytest.mark.skipif(not (fastrnn.available() and fastrnn.cpu_tiles_available()),
                           reason="needs AMX-BF16 or AVX512-BF16, and the AVX-512 kernels")

CELLS = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", None), ("gru", None)]


def _direction(layer, cell, x, h, c, suffix, round_state):
    """One direction of a one-layer call, step by step in float32 from
    float64 products of bfloat16 values; x (T, N, C) in the direction's
    order. The outputs (T, N, H) in float32."""
    w_ih, w_hh, b_ih, b_hh = (getattr(layer, f"{n}_l0{suffix}").float()
                              for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    ys = []
    for xt in x.float():
        hb = h.bfloat16().float() if round_state else h
        gi = (xt.double() @ w_ih.double().T).float() + b_ih
        gh = (hb.double() @ w_hh.double().T).float() + b_hh
        if cell == "rnn":
            pre = (xt.double() @ w_ih.double().T + hb.double() @ w_hh.double().T).float() + b_ih + b_hh
            h = torch.tanh(pre) if layer.nonlinearity == "tanh" else torch.relu(pre)
        elif cell == "lstm":
            pre = (xt.double() @ w_ih.double().T + hb.double() @ w_hh.double().T).float() + b_ih + b_hh
            i, f, g, o = pre.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            H = h.shape[1]
            rz = (xt.double() @ w_ih[:2 * H].double().T
                  + hb.double() @ w_hh[:2 * H].double().T).float() + b_ih[:2 * H] + b_hh[:2 * H]
            r, z = torch.sigmoid(rz).chunk(2, 1)
            n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
            h = (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys)


def _reference(layer, cell, x, round_state):
    N, H = x.shape[1], layer.hidden_size
    h = torch.zeros(N, H)
    c = torch.zeros(N, H)
    ys = [_direction(layer, cell, x, h, c, "", round_state)]
    if layer.bidirectional:
        ys.append(_direction(layer, cell, x.flip(0), h, c, "_reverse", round_state).flip(0))
    return torch.cat(ys, 2).bfloat16()


def _agreement(got, want):
    """The fraction of values equal to the bit, and the largest difference
    in units of bfloat16's spacing at the reference's magnitude. A state
    rounded the other way at one step (the two sides' float32 sums and
    activations differ in the last bits, more so in a build at -O1) moves
    the values after it by a few units: the bound is 8, and the fraction
    tells the rounded state from the unrounded one (0.7-0.9 identical)."""
    same = (got == want).float().mean().item()
    spacing = want.float().abs().clamp_min(1e-3) * 2.0 ** -7
    ulps = ((got.float() - want.float()).abs() / spacing).max().item()
    return same, ulps


@TILES
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [17, 37])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell,act", CELLS)
def test_tiles_match_the_rounded_state_reference(cell, act, bidirectional, batch, threads):
    """Rows in whole tiles of 16 and a last one of fewer (37 on one thread:
    16, 16 and 5; 17: 16 and 1; on two threads each thread's share); H = 40
    pads every gate block to 48 columns (three column tiles); C + P = 47
    deep in two tiles of 32."""
    torch.manual_seed(0)
    kw = dict(nonlinearity=act) if act else {}
    ref, ours = pair(7, 40, cell, dtype=torch.bfloat16, bidirectional=bidirectional, **kw)
    x = torch.randn(11, batch, 7).bfloat16()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), fastrnn.kernels(cpu_tiles="auto"):
            got = ours(x)[0]
        with torch.no_grad(), fastrnn.kernels(cpu_tiles="never"):
            unrounded = ours(x)[0]
    finally:
        torch.set_num_threads(prev)
    assert ours.last_path == "fused"
    rounded_ref = _reference(ref, cell, x, round_state=True)
    same, ulps = _agreement(got, rounded_ref)
    assert same >= 0.97 and ulps <= 8, (same, ulps)
    # The float32 products carry h unrounded: the other reference, and a
    # different result, so the check above sees the tiles.
    same_f32, ulps_f32 = _agreement(unrounded, _reference(ref, cell, x, round_state=False))
    assert same_f32 >= 0.97 and ulps_f32 <= 8, (same_f32, ulps_f32)
    assert (got != unrounded).float().mean().item() > 0.03


@TILES
@pytest.mark.parametrize("cell,act", CELLS)
def test_tiles_split_by_units_give_the_same_bits(cell, act):
    """Weights past 512 KB in bfloat16 and 5 rows: two threads split the
    units (each packs and reads its slice, the last one 154 units wide at
    hidden 330), one thread runs them all; the same bits, forward and
    backward, and the rounded state's reference."""
    torch.manual_seed(3)
    kw = dict(nonlinearity=act) if act else {}
    hidden = 520 if cell == "rnn" else 330
    ref, ours = pair(7, hidden, cell, dtype=torch.bfloat16, bidirectional=True, **kw)
    x = torch.randn(6, 5, 7).bfloat16()
    prev = torch.get_num_threads()
    outs, grads = [], []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(ours(x))
            xi = x.clone().requires_grad_()
            y = ours(xi)[0]
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
            grads.append(torch.autograd.grad(y, [xi] + list(ours.parameters()), g))
    finally:
        torch.set_num_threads(prev)
    (y1, h1), (y2, h2) = outs
    assert torch.equal(y1, y2)
    for a, b in zip(h1 if isinstance(h1, tuple) else (h1,), h2 if isinstance(h2, tuple) else (h2,)):
        assert torch.equal(a, b)
    # The backward's carry split by columns of W_hh on two threads.
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    same, ulps = _agreement(y2, _reference(ref, cell, x, round_state=True))
    assert same >= 0.97 and ulps <= 8, (same, ulps)


@TILES
@pytest.mark.parametrize("cell,act", CELLS)
def test_tiles_train_within_twice_torch_nn_error(cell, act):
    """Outputs, final states and every gradient (the backward runs the
    float32 kernels on what the forward kept) against torch.nn's bfloat16
    layer: within twice torch.nn's own error against float64, packed
    sequences and two layers included. For relu the outputs and states
    only, as test_cpu_half_types_within_twice_torch_nn_error has it: a
    pre-activation within rounding of zero takes either side of the kink
    in either implementation, and its gradient with it (with torch 2.11's
    torch.nn, a weight's gradient 1.7 from float64's where torch.nn's was
    0.7)."""
    torch.manual_seed(1)
    kw = dict(nonlinearity=act) if act else {}
    ref, ours = pair(5, 24, cell, dtype=torch.bfloat16, num_layers=2, bidirectional=True, **kw)
    truth = pair(5, 24, cell, dtype=torch.float64, num_layers=2, bidirectional=True, **kw)[0]
    truth.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    x = torch.randn(16, 6, 5).bfloat16()
    lengths = [16, 14, 9, 9, 5, 2]
    results = []
    for layer, dtype in ((ref, torch.bfloat16), (ours, torch.bfloat16), (truth, torch.float64)):
        xi = x.to(dtype).requires_grad_()
        packed = nn.utils.rnn.pack_padded_sequence(xi, lengths)
        y, state = layer(packed)
        y = nn.utils.rnn.pad_packed_sequence(y)[0]
        states = state if isinstance(state, tuple) else (state,)
        g = torch.Generator().manual_seed(2)
        loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
        for s in states:
            loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
        grads = torch.autograd.grad(loss, [xi] + list(layer.parameters()))
        if act == "relu":
            grads = ()
        results.append([t.detach().double() for t in (y, *states, *grads)])
    assert ours.last_path == "fused"
    for a, b, r in zip(*results):
        err_ref = (a - r).abs().max().item()
        err = (b - r).abs().max().item()
        assert err <= 2 * err_ref + 1e-3 * r.abs().max().item(), (err, err_ref)


@TILES
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("rows,depth,cols", [(1, 1, 16), (5, 31, 40), (16, 33, 48), (17, 96, 7),
                                             (37, 70, 33), (40, 64, 64)])
def test_tile_matmul_is_the_rounded_product(rows, depth, cols, accumulate):
    """The backward's carry product alone: rows in whole tiles and a last
    partial one, depths that leave part of a tile, column tiles two at a
    time and one alone; c + a w where it accumulates."""
    torch.manual_seed(rows * depth)
    a, w = torch.randn(rows, depth), torch.randn(depth, cols)
    c = torch.randn(rows, cols) if accumulate else None
    got = fastrnn._ops._C.tile_matmul(a, w, c)
    want = a.bfloat16().double() @ w.bfloat16().double()
    if accumulate:
        want = want + c.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5 * depth ** 0.5)


@TILES
@pytest.mark.parametrize("rows", range(1, 27))
def test_tile_matmul_every_block_of_rows(rows):
    """Without tiles the rows run in blocks of up to 12, as even as they
    go: every block size from 1 to 12 (26 rows: 9, 9, 8), over a pair of
    column tiles and a last one alone, the depth past two tiles."""
    torch.manual_seed(rows)
    a, w, c = torch.randn(rows, 70), torch.randn(70, 40), torch.randn(rows, 40)
    got = fastrnn._ops._C.tile_matmul(a, w, c)
    want = a.bfloat16().double() @ w.bfloat16().double() + c.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5 * 70 ** 0.5)


@TILES
def test_tiles_setting():
    assert fastrnn.cpu_tiles() == "auto"
    with fastrnn.kernels(cpu_tiles="never"):
        assert fastrnn.cpu_tiles() == "never"
    assert fastrnn.cpu_tiles() == "auto"
    with pytest.raises(ValueError, match="Unknown tiles setting 'sometimes'"):
        fastrnn.set_cpu_tiles("sometimes")
    # Below AVX-512 the float32 kernels of that instruction set run.
    with fastrnn.kernels(cpu_isa="avx2"):
        assert not fastrnn.cpu_tiles_available()
