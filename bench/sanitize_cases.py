"""Small forward+backward calls of every CUDA path, for compute-sanitizer:

    compute-sanitizer --tool memcheck python bench/sanitize_cases.py
"""

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import _ops

# (path, blocks per cluster or grid group); the grid in groups of three, so
# that its members exchange state through global memory, and last: should a
# tool hold back some of its blocks, its barrier would wait for them, and the
# other paths' results are printed by then.
paths = [("persistent", 0), ("step", 0)]
if torch.cuda.get_device_capability()[0] >= 9:
    paths.append(("cluster", 2))
paths.append(("grid", 3))
for path, blocks in paths:
    _ops._C.set_cuda_path(path, blocks)
    # Every dtype's kernels once; the activation does not change any access.
    for dtype, nonlinearity in ((torch.float32, "tanh"), (torch.float64, "relu"),
                                (torch.bfloat16, "tanh")):
        m = fastrnn.RNN(5, 33, 2, bidirectional=True, nonlinearity=nonlinearity,
                        backend="fused", device="cuda", dtype=dtype)
        x = torch.randn(7, 3, 5, device="cuda", dtype=dtype, requires_grad=True)
        y, h = m(x)
        (y.float().sum() + h.float().sum()).backward()
        packed = pack_padded_sequence(x, torch.tensor([7, 2, 5]), enforce_sorted=False)
        y, h = m(packed)
        (y.data.float().sum() + h.float().sum()).backward()
    print(path, "ok:", _ops._C.last_cuda_path())
torch.cuda.synchronize()
print("sanitize cases done")
