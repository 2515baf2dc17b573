// The emulator for double storage, every cell (one file per type, so that
// they compile in parallel).
#include "cuda/recurrence_cuda_emulate.h"

namespace fastrnn {
namespace cuda {
FASTRNN_FOR_EACH_CELL(FASTRNN_INSTANTIATE_EMULATOR, double)
}  // namespace cuda
}  // namespace fastrnn
