// The CPU time loops compiled for AVX-512 (x86-64 only). float's tanh and
// sigmoid are the kernels' own; double's tanh and exp are SLEEF's, which
// torch's CPU library exports.
#include <cstdint>
#include <cstring>

#include "cpu/recurrence_cpu.h"

#if FASTRNN_WITH_AVX512
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")

extern "C" __m512d Sleef_tanhd8_u35avx512f(__m512d);
extern "C" __m512d Sleef_expd8_u10avx512f(__m512d);

namespace fastrnn {
namespace cpu {
namespace avx512 {

typedef double vd __attribute__((vector_size(64)));
typedef float vf __attribute__((vector_size(64)));
// SLEEF's 3.5-ulp tanh: 12 ns a vector here where its 1-ulp one takes 27
// (a quarter of an Elman float64 forward's time at hidden 256), and within
// 3 ulp of the C library's over [-20, 20].
inline vd tanh_vec(vd x) { return (vd)Sleef_tanhd8_u35avx512f((__m512d)x); }
// An estimate of 1 / q to 14 bits, which its callers refine: a few cycles
// where vdivps costs a dozen.
// (The zero-masked form with every lane set: the same instruction, and
// GCC 12 warns of the plain form's undefined pass-through operand.)
inline vf reciprocal(vf q) { return (vf)_mm512_maskz_rcp14_ps(__mmask16(-1), (__m512)q); }
inline vd exp_vec(vd x) { return (vd)Sleef_expd8_u10avx512f((__m512d)x); }
// a < b ? a : b and a > b ? a : b, b where either is NaN: one instruction
// each, where the compare and blend of the same select take two (the
// zero-masked forms, as for reciprocal()).
inline vf lesser(vf a, vf b) {
  return (vf)_mm512_maskz_min_ps(__mmask16(-1), (__m512)a, (__m512)b);
}
inline vf greater(vf a, vf b) {
  return (vf)_mm512_maskz_max_ps(__mmask16(-1), (__m512)a, (__m512)b);
}
// a b + c rounded once.
inline vf multiply_add(vf a, vf b, vf c) {
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
inline vd multiply_add(vd a, vd b, vd c) {
  return (vd)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace fastrnn

#define FASTRNN_CPU_ISA avx512
#define FASTRNN_VEC_BYTES 64
#include "cpu/recurrence_cpu_kernels.h"

namespace fastrnn {
namespace cpu {
namespace avx512 {
FASTRNN_CPU_INSTANTIATE(float)
FASTRNN_CPU_INSTANTIATE(double)
}  // namespace avx512
}  // namespace cpu
}  // namespace fastrnn

#pragma GCC pop_options
#endif  // FASTRNN_WITH_AVX512
