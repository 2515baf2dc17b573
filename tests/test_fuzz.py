"""Property-based comparison with nn.RNN over random configurations and inputs.

`make test` runs a bounded, derandomised number of examples; set
FASTRNN_FUZZ_EXAMPLES (e.g. 2000) to search deeper.
"""

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from helpers import DEVICES, compare, pair

EXAMPLES = int(os.environ.get("FASTRNN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def configs(draw):
    return dict(
        input_size=draw(st.integers(1, 9)),
        hidden_size=draw(st.integers(1, 40)),
        num_layers=draw(st.integers(1, 3)),
        nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
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
        p = pack_padded_sequence(x, lengths, batch_first=c["batch_first"], enforce_sorted=False)
        return PackedSequence(p.data.detach().requires_grad_(), p.batch_sizes, p.sorted_indices,
                              p.unsorted_indices), lengths
    return x.requires_grad_(), None


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(c=configs())
def test_random_configurations_match_nn_rnn(device, c):
    check_configuration(device, c)


@contextlib.contextmanager
def emulated_cuda(path):
    from fastrnn import _ops

    _ops._C.set_cuda_path(path)
    _ops._C.set_cuda_emulation(True)
    try:
        yield
    finally:
        _ops._C.set_cuda_emulation(False)
        _ops._C.set_cuda_path("auto")


@pytest.mark.skipif(not fastrnn.cuda_built(), reason="needs the CUDA build")
@pytest.mark.parametrize("path", ["persistent", "cluster", "grid", "step"])
@settings(max_examples=max(10, EXAMPLES // 4), derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(c=configs())
def test_random_configurations_through_the_emulated_cuda_kernels(path, c):
    with emulated_cuda(path):
        check_configuration("cpu", c)


def check_configuration(device, c):
    kw = {k: c[k] for k in ("num_layers", "nonlinearity", "bias", "batch_first", "bidirectional")}
    ref, ours = pair(c["input_size"], c["hidden_size"], device=device, dtype=c["dtype"], **kw)
    x, _ = build_input(c, device)
    D = 2 if c["bidirectional"] else 1
    h0 = None
    if c["with_h0"]:
        n = None if (not isinstance(x, PackedSequence) and x.dim() == 2) else \
            (x.sorted_indices.numel() if isinstance(x, PackedSequence) else c["batch"])
        shape = (c["num_layers"] * D, c["hidden_size"]) if n is None else (c["num_layers"] * D, n, c["hidden_size"])
        h0 = torch.randn(*shape, dtype=c["dtype"], device=device).requires_grad_()
    compare(ref, ours, x, h0)


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(nonlinearity=st.sampled_from(["tanh", "relu"]),
       bidirectional=st.booleans(),
       where=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2), st.integers(0, 3),
                                st.sampled_from([float("nan"), float("inf"), -float("inf")])),
                      min_size=1, max_size=3))
def test_nan_and_inf_propagate_where_nn_rnn_propagates_them(device, nonlinearity, bidirectional, where):
    ref, ours = pair(4, 5, device=device, dtype=torch.float64, num_layers=2,
                     nonlinearity=nonlinearity, bidirectional=bidirectional)
    x = torch.randn(6, 3, 4, dtype=torch.float64, device=device)
    for t, n, c, v in where:
        x[t, n, c] = v
    with torch.no_grad():
        y_ref, h_ref = ref(x)
        y, h = ours(x)
    for a, b in ((y, y_ref), (h, h_ref)):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        finite = torch.isfinite(b)
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-10, atol=1e-12)
        assert torch.equal(a[torch.isinf(b)], b[torch.isinf(b)])
