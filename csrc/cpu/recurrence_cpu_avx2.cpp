// The CPU time loops compiled for AVX2 and FMA (x86-64, but for builds of
// FASTRNN_CPU_ISAS=base). float's tanh and sigmoid are the kernels' own;
// double's tanh and exp are SLEEF's, which torch's CPU library exports.
#include <cstdint>
#include <cstring>

#include "cpu/recurrence_cpu.h"

#if FASTRNN_WITH_AVX2
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

extern "C" __m256d Sleef_tanhd4_u35avx2(__m256d);
extern "C" __m256d Sleef_expd4_u10avx2(__m256d);

namespace fastrnn {
namespace cpu {
namespace avx2 {

typedef double vd __attribute__((vector_size(32)));
typedef float vf __attribute__((vector_size(32)));
// SLEEF's 3.5-ulp tanh, as with AVX-512 (recurrence_cpu_avx512.cpp).
inline vd tanh_vec(vd x) { return (vd)Sleef_tanhd4_u35avx2((__m256d)x); }
// 1 / q from a 12-bit estimate and one Newton step (about 2^-22), which
// its callers refine.
inline vf reciprocal(vf q) {
  const vf r = (vf)_mm256_rcp_ps((__m256)q);
  return r * (2.f - q * r);
}
inline vd exp_vec(vd x) { return (vd)Sleef_expd4_u10avx2((__m256d)x); }
// a < b ? a : b and a > b ? a : b, b where either is NaN (as with AVX-512).
inline vf lesser(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
inline vf greater(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
// a b + c rounded once.
inline vf multiply_add(vf a, vf b, vf c) {
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
inline vd multiply_add(vd a, vd b, vd c) {
  return (vd)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
}

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
#endif  // FASTRNN_WITH_AVX2
