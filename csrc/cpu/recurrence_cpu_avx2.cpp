// The CPU time loops compiled for AVX2 and FMA (x86-64 only). float's tanh is
// the kernels' own; double's is SLEEF's, which torch's CPU library exports.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/recurrence_cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

extern "C" __m256d Sleef_tanhd4_u10avx2(__m256d);

namespace fastrnn {
namespace cpu {
namespace avx2 {

// The tail goes through the same vector function as the body (padded with
// zeros), so an element's value does not depend on its position.
inline void tanh_inplace(double* x, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(x + i, Sleef_tanhd4_u10avx2(_mm256_loadu_pd(x + i)));
  if (i < n) {
    double buf[4] = {0, 0, 0, 0};
    std::memcpy(buf, x + i, sizeof(double) * (n - i));
    _mm256_storeu_pd(buf, Sleef_tanhd4_u10avx2(_mm256_loadu_pd(buf)));
    std::memcpy(x + i, buf, sizeof(double) * (n - i));
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace fastrnn

#define FASTRNN_CPU_ISA avx2
#define FASTRNN_VEC_BYTES 32
#include "cpu/recurrence_cpu_kernels.h"

#pragma GCC pop_options
#endif  // __x86_64__
