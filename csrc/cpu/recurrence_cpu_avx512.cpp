// The CPU time loops compiled for AVX-512 (x86-64 only). float's tanh is the
// kernels' own; double's is SLEEF's, which torch's CPU library exports.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/recurrence_cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")

extern "C" __m512d Sleef_tanhd8_u10avx512f(__m512d);

namespace fastrnn {
namespace cpu {
namespace avx512 {

// The tail goes through the same vector function as the body (masked), so an
// element's value does not depend on its position.
inline void tanh_inplace(double* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm512_storeu_pd(x + i, Sleef_tanhd8_u10avx512f(_mm512_loadu_pd(x + i)));
  if (i < n) {
    const __mmask8 m = static_cast<__mmask8>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_pd(x + i, m, Sleef_tanhd8_u10avx512f(_mm512_maskz_loadu_pd(m, x + i)));
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace fastrnn

#define FASTRNN_CPU_ISA avx512
#define FASTRNN_VEC_BYTES 64
#include "cpu/recurrence_cpu_kernels.h"

#pragma GCC pop_options
#endif  // __x86_64__
