// The CPU time loops for any processor: the compiler's baseline vectors;
// float's tanh and sigmoid are the kernels' own, double's the C library's,
// lane by lane.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/recurrence_cpu.h"

namespace fastrnn {
namespace cpu {
namespace base {

typedef double vd __attribute__((vector_size(16)));
typedef float vf __attribute__((vector_size(16)));
inline vd tanh_vec(vd x) {
  for (int i = 0; i < 2; ++i) x[i] = std::tanh(x[i]);
  return x;
}
inline vd exp_vec(vd x) {
  for (int i = 0; i < 2; ++i) x[i] = std::exp(x[i]);
  return x;
}
inline vf reciprocal(vf q) { return 1.f / q; }
// a < b ? a : b and a > b ? a : b, b where either is NaN.
inline vf lesser(vf a, vf b) { return a < b ? a : b; }
inline vf greater(vf a, vf b) { return a > b ? a : b; }
// As written: x86-64's baseline has no fused multiply-add. (Where a
// target has one, the compiler picks the product to fuse; these vectors
// step one at a time, in the same code for every lane.)
inline vf multiply_add(vf a, vf b, vf c) { return a * b + c; }
inline vd multiply_add(vd a, vd b, vd c) { return a * b + c; }

}  // namespace base
}  // namespace cpu
}  // namespace fastrnn

#define FASTRNN_CPU_ISA base
#define FASTRNN_VEC_BYTES 16
#include "cpu/recurrence_cpu_kernels.h"

namespace fastrnn {
namespace cpu {
namespace base {
FASTRNN_CPU_INSTANTIATE(float)
FASTRNN_CPU_INSTANTIATE(double)
}  // namespace base
}  // namespace cpu
}  // namespace fastrnn
