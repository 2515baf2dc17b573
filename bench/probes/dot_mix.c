// The instruction mix of the CPU kernels' dot form (weights as stored, a
// cell's step), alone: blocks of 4 weight rows of K floats against 4 rows
// of x at a time, 16 accumulators of 16 lanes, added into one at each
// block's end; every weight row once per pass, rows of x from L1. Passes over
// the same J x K weights repeat, so that weights of up to about 1.5 MB stay
// in L2. Prints the best pass's multiply-adds a second.
//
//   gcc -O3 -march=native bench/probes/dot_mix.c -o /tmp/dot_mix
//   /tmp/dot_mix J K R   (e.g. 512 768 8: an RNNCell 256->512 at batch 8)
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s J K R (J, R multiples of 4, K of 16)\n", argv[0]);
    return 2;
  }
  const int J = atoi(argv[1]), K = atoi(argv[2]), R = atoi(argv[3]);
  if (J <= 0 || K <= 0 || R <= 0 || J % 4 || R % 4 || K % 16) {
    fprintf(stderr, "J and R must be multiples of 4, K of 16\n");
    return 2;
  }
  float* w = aligned_alloc(64, (size_t)J * K * sizeof(float));
  float* x = aligned_alloc(64, (size_t)R * K * sizeof(float));
  float* out = aligned_alloc(64, (size_t)J * R * sizeof(float));
  for (size_t i = 0; i < (size_t)J * K; ++i) w[i] = 1e-3f * (float)(i % 7);
  for (size_t i = 0; i < (size_t)R * K; ++i) x[i] = 1e-3f * (float)(i % 5);
  double best = 1e30;
  for (int rep = 0; rep < 30; ++rep) {
    const double t0 = now();
    for (int j = 0; j < J; j += 4) {
      const float* w0 = w + (size_t)j * K;
      for (int r0 = 0; r0 < R; r0 += 4) {
        __m512 acc[16];
        for (int q = 0; q < 16; ++q) acc[q] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
          const __m512 a0 = _mm512_load_ps(w0 + k), a1 = _mm512_load_ps(w0 + K + k);
          const __m512 a2 = _mm512_load_ps(w0 + 2 * K + k), a3 = _mm512_load_ps(w0 + 3 * K + k);
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            const __m512 b = _mm512_load_ps(x + (size_t)(r0 + r) * K + k);
            acc[r * 4 + 0] = _mm512_fmadd_ps(b, a0, acc[r * 4 + 0]);
            acc[r * 4 + 1] = _mm512_fmadd_ps(b, a1, acc[r * 4 + 1]);
            acc[r * 4 + 2] = _mm512_fmadd_ps(b, a2, acc[r * 4 + 2]);
            acc[r * 4 + 3] = _mm512_fmadd_ps(b, a3, acc[r * 4 + 3]);
          }
        }
        // Less than the kernels' fold of 16 accumulators into one vector
        // of 16 sums (15 additions and 30 shuffles): 15 additions, so that
        // the probe bounds the mix from above.
        for (int q = 8; q > 0; q /= 2)
          for (int i = 0; i < q; ++i) acc[i] = _mm512_add_ps(acc[i], acc[i + q]);
        const size_t block = (size_t)(j / 4) * (R / 4) + r0 / 4;
        _mm512_store_ps(out + block % ((size_t)J * R / 16) * 16, acc[0]);
      }
    }
    const double dt = now() - t0;
    if (dt < best) best = dt;
  }
  const double macs = (double)J * K * R;
  printf("J %d K %d R %d (%.2f MB of weights): %.1f us a pass, %.1f GFMA/s (%g)\n", J, K, R,
         (double)J * K * sizeof(float) / 1e6, best * 1e6, macs / best / 1e9, out[3]);
  free(w);
  free(x);
  free(out);
  return 0;
}
