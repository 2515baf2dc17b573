// The emulator's one piece of state outside a launch (recurrence_cuda_emulate.h).
#include <atomic>

#include "cuda/recurrence_cuda_emulate.h"

namespace fastrnn {
namespace cuda {

std::atomic<int64_t> emulation::wave_blocks_forced{0};

void set_emulator_blocks(int64_t blocks) { emulation::wave_blocks_forced.store(blocks); }

}  // namespace cuda
}  // namespace fastrnn
