"""Property-based comparison with torch.nn's layers over random cells,
configurations and inputs.

`make test` runs a bounded, derandomised number of examples; set
FASTRNN_FUZZ_EXAMPLES (e.g. 2000) to search deeper.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from helpers import CELLS, DEVICES, compare, initial_state, packed_leaf, pair

EXAMPLES = int(os.environ.get("FASTRNN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def configs(draw):
    cell = draw(st.sampled_from(["rnn", "lstm", "gru"]))
    hidden = draw(st.integers(1, 40))
    options = {}
    if cell == "rnn":
        options["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    elif cell == "lstm" and hidden > 1 and draw(st.booleans()):
        options["proj_size"] = draw(st.integers(1, hidden - 1))
    return dict(
        cell=cell,
        options=options,
        input_size=draw(st.integers(1, 9)),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        steps=draw(st.integers(1, 12)),
        batch=draw(st.integers(0, 6)),
        layout=draw(st.sampled_from(["contiguous", "strided", "expanded", "unbatched", "packed"])),
        with_h0=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def build_input(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    T, N, C, dt = c["steps"], c["batch"], c["input_size"], c["dtype"]
    layout = c["layout"]
    if layout in ("unbatched", "packed") and N == 0:
        layout = "contiguous"
    if layout == "unbatched":
        return torch.randn(T, C, generator=g, dtype=dt).to(device).requires_grad_(), None
    shape = (N, T, C) if c["batch_first"] else (T, N, C)
    if layout == "strided":
        big = torch.randn(*shape[:-1], 2 * C + 1, generator=g, dtype=dt).to(device)
        return big[..., 1::2].detach().requires_grad_(), None
    if layout == "expanded":
        row = torch.randn(*shape[:-1], 1, generator=g, dtype=dt).to(device)
        return row.expand(*shape).detach().requires_grad_(), None
    x = torch.randn(*shape, generator=g, dtype=dt).to(device)
    if layout == "packed":
        lengths = torch.randint(1, T + 1, (N,), generator=g)
        return packed_leaf(x, lengths, batch_first=c["batch_first"]), lengths
    return x.requires_grad_(), None


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(c=configs())
def test_random_configurations_match_nn_rnn(device, c):
    check_configuration(device, c)


@pytest.mark.skipif(not fastrnn.cuda_built(), reason="needs the CUDA build")
@pytest.mark.parametrize("path", ["persistent", "cluster", "grid", "step"])
@settings(max_examples=max(10, EXAMPLES // 4), derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(c=configs())
def test_random_configurations_through_the_emulated_cuda_kernels(path, c):
    if c["options"].get("proj_size") and path != "step":
        c = dict(c, options={})  # projections take the step path only
    with fastrnn.kernels(cuda_path=path, emulate_cuda=True):
        check_configuration("cpu", c)


def check_configuration(device, c):
    kw = {k: c[k] for k in ("num_layers", "bias", "batch_first", "bidirectional")}
    ref, ours = pair(c["input_size"], c["hidden_size"], c["cell"], device=device, dtype=c["dtype"],
                     **kw, **c["options"])
    x, _ = build_input(c, device)
    h0 = None
    if c["with_h0"]:
        unbatched = not isinstance(x, PackedSequence) and x.dim() == 2
        n = x.sorted_indices.numel() if isinstance(x, PackedSequence) else c["batch"]
        h0 = initial_state(ref, n, device, c["dtype"], unbatched=unbatched)
    compare(ref, ours, x, h0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,options", CELLS)
@FUZZ
@given(bidirectional=st.booleans(),
       where=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2), st.integers(0, 3),
                                st.sampled_from([float("nan"), float("inf"), -float("inf")])),
                      min_size=1, max_size=3))
def test_nan_and_inf_propagate_where_torch_nn_propagates_them(device, cell, options, bidirectional,
                                                            where):
    ref, ours = pair(4, 5, cell, device=device, dtype=torch.float64, num_layers=2,
                     bidirectional=bidirectional, **options)
    x = torch.randn(6, 3, 4, dtype=torch.float64, device=device)
    for t, n, c, v in where:
        x[t, n, c] = v
    with torch.no_grad():
        y_ref, h_ref = ref(x)
        y, h = ours(x)
    pairs = [(y, y_ref)] + list(zip(h if isinstance(h, tuple) else (h,),
                                    h_ref if isinstance(h_ref, tuple) else (h_ref,)))
    for a, b in pairs:
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        finite = torch.isfinite(b)
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-10, atol=1e-12)
        assert torch.equal(a[torch.isinf(b)], b[torch.isinf(b)])
