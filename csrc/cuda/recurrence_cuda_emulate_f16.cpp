// The emulator for half storage, every cell (one file per type, so that
// they compile in parallel).
#include "cuda/recurrence_cuda_emulate.h"

namespace fastrnn {
namespace cuda {
FASTRNN_FOR_EACH_CELL(FASTRNN_INSTANTIATE_EMULATOR, __half)
}  // namespace cuda
}  // namespace fastrnn
