import pytest
import torch

import fastrnn


def pytest_report_header(config):
    from fastrnn import _ops

    if not _ops.available():
        return f"fastrnn extension: NOT BUILT ({_ops.extension_error()})"
    return (
        f"fastrnn extension: {_ops._C.__file__}, cuda_built={_ops.cuda_built()}, "
        f"cpu_isa={_ops._C.cpu_isa()}, "
        f"torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}"
    )


@pytest.fixture(autouse=True, scope="session")
def _extension_is_built():
    # Every test of the fused path must run the fused kernel: a missing
    # extension is a failure, not a skip.
    from fastrnn import _ops

    assert _ops.available(), f"fastrnn's extension failed to load: {_ops.extension_error()}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
