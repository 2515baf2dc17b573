// The CPU time loops compiled for AVX2 and FMA (x86-64 only). float's tanh is
// the kernels' own; double's tanh and both exps are SLEEF's, which torch's
// CPU library exports.
#include <cstdint>
#include <cstring>

#include "cpu/recurrence_cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

extern "C" __m256d Sleef_tanhd4_u35avx2(__m256d);
extern "C" __m256d Sleef_expd4_u10avx2(__m256d);
extern "C" __m256 Sleef_expf8_u10avx2(__m256);

namespace fastrnn {
namespace cpu {
namespace avx2 {

typedef double vd __attribute__((vector_size(32)));
typedef float vf __attribute__((vector_size(32)));
// SLEEF's 3.5-ulp tanh, as with AVX-512 (recurrence_cpu_avx512.cpp).
inline vd tanh_vec(vd x) { return (vd)Sleef_tanhd4_u35avx2((__m256d)x); }
// p / q through a 12-bit reciprocal and one Newton step (about 2^-22
// relative).
inline vf divide(vf p, vf q) {
  vf r = (vf)_mm256_rcp_ps((__m256)q);
  r = r * (2.f - q * r);
  return p * r;
}
inline vd exp_vec(vd x) { return (vd)Sleef_expd4_u10avx2((__m256d)x); }
inline vf exp_vec(vf x) { return (vf)Sleef_expf8_u10avx2((__m256)x); }

}  // namespace avx2
}  // namespace cpu
}  // namespace fastrnn

#define FASTRNN_CPU_ISA avx2
#define FASTRNN_VEC_BYTES 32
#include "cpu/recurrence_cpu_kernels.h"

namespace fastrnn {
namespace cpu {
namespace avx2 {
FASTRNN_CPU_INSTANTIATE(float)
FASTRNN_CPU_INSTANTIATE(double)
}  // namespace avx2
}  // namespace cpu
}  // namespace fastrnn

#pragma GCC pop_options
#endif  // __x86_64__
