// The CPU time loops for any processor: the compiler's baseline vectors;
// float's tanh is the kernels' own, double's the C library's.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/recurrence_cpu.h"

namespace fastrnn {
namespace cpu {
namespace base {

inline void tanh_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::tanh(x[i]);
}

}  // namespace base
}  // namespace cpu
}  // namespace fastrnn

#define FASTRNN_CPU_ISA base
#define FASTRNN_VEC_BYTES 16
#include "cpu/recurrence_cpu_kernels.h"
