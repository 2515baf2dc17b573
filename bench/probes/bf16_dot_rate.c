// The rate of AVX512-BF16's VDPBF16PS against 512-bit float32 FMAs on one
// core: twelve independent chains of each, as the roofline's FMA probe
// runs them. VDPBF16PS adds two products of bfloat16 values to each of 16
// float32 sums, so it counts 32 multiply-adds; an FMA counts 16. Prints
// the multiply-adds a second of each, three times.
//
//   gcc -O2 bench/probes/bf16_dot_rate.c -o /tmp/bf16_dot_rate
//   /tmp/bf16_dot_rate
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// Twelve chains of n rounds of VDPBF16PS (bf16 true) or of FMAs.
__attribute__((target("avx512f,avx512bw,avx512bf16"), noinline))
static float chains(long n, int bf16) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps((float)i);
  // 1.0 and 0.5 in both halves of each lane, as bfloat16 pairs; as float32
  // values near 1.0 and 0.5.
  __m512 x = _mm512_castsi512_ps(_mm512_set1_epi32(0x3f803f80));
  const __m512 y = _mm512_castsi512_ps(_mm512_set1_epi32(0x3f003f00));
  for (long k = 0; k < n; ++k) {
    if (bf16) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)x, (__m512bh)y);
    } else {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], x, y);
    }
    __asm__ volatile("" : "+v"(x));  // a new operand each round: nothing hoisted
  }
  __m512 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

int main(void) {
  if (!__builtin_cpu_supports("avx512bf16")) {
    fprintf(stderr, "this processor has no AVX512-BF16\n");
    return 2;
  }
  const long n = 50000000;
  for (int round = 0; round < 3; ++round) {
    double t = now();
    volatile float sink = chains(n, 1);
    double dt = now() - t;
    printf("VDPBF16PS: %.1f G multiply-adds/s\n", n * 12.0 * 32 / dt / 1e9);
    t = now();
    sink = chains(n, 0);
    dt = now() - t;
    printf("FMA (512-bit): %.1f G multiply-adds/s\n", n * 12.0 * 16 / dt / 1e9);
    (void)sink;
  }
  return 0;
}
