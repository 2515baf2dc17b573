// The CUDA time-loop kernels for __half storage, every cell (one file per type,
// so that they compile in parallel).
#include "cuda/recurrence_cuda_kernels.cuh"

namespace fastrnn {
namespace cuda {
FASTRNN_FOR_EACH_CELL(FASTRNN_INSTANTIATE_KERNELS, __half)
}  // namespace cuda
}  // namespace fastrnn
