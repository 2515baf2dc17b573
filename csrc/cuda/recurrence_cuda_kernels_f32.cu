// The CUDA time-loop kernels for float storage, every cell (one file per type,
// so that they compile in parallel).
#include "cuda/recurrence_cuda_kernels.cuh"

namespace fastrnn {
namespace cuda {
FASTRNN_FOR_EACH_CELL(FASTRNN_INSTANTIATE_KERNELS, float)
}  // namespace cuda
}  // namespace fastrnn
