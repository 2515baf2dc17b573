// The instruction mix of the CPU kernels' dot form (weights as stored, a
// cell's step), alone, in the kernels' register block: with AVX-512's 32
// registers, blocks of 4 weight rows against 4 rows of x at a time (16
// accumulators of 16 lanes); with 16 registers, 3 weight rows against 4
// rows (12 accumulators, the weight vectors kept in registers), as
// dot_gemm() runs them from 4 rows on. Each block's accumulators are added into one at its
// end; every weight row is read once per pass, rows of x from L1. Passes
// over the same J x K weights repeat, so that weights that fit in L2 stay
// there. Prints the best pass's multiply-adds a second.
//
//   gcc -O3 -march=native bench/probes/dot_mix.c -o /tmp/dot_mix
//   /tmp/dot_mix J K R   (e.g. 512 768 8: an RNNCell 256->512 at batch 8;
//   J is taken down to a multiple of the block's weight rows, and printed)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ROWS 4
#if defined(__AVX512F__)
#define VEC_BYTES 64
#define COLS 4
#elif defined(__AVX__)
#define VEC_BYTES 32
#define COLS 3
#else
#define VEC_BYTES 16
#define COLS 3
#endif
#define LANES (VEC_BYTES / 4)
typedef float vec __attribute__((vector_size(VEC_BYTES), may_alias));

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// v as a register operand, as the kernels' in_register(): loaded once for
// the block's rows, not folded into each multiply-add.
static inline vec in_register(vec v) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+v"(v));
#endif
  return v;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s J K R (J at least %d, R a multiple of %d, K of %d)\n", argv[0],
            COLS, ROWS, LANES);
    return 2;
  }
  const int J = atoi(argv[1]) / COLS * COLS, K = atoi(argv[2]), R = atoi(argv[3]);
  if (J <= 0 || K <= 0 || R <= 0 || R % ROWS || K % LANES) {
    fprintf(stderr, "J must be at least %d, R a multiple of %d, K of %d\n", COLS, ROWS, LANES);
    return 2;
  }
  float* w = aligned_alloc(64, (size_t)J * K * sizeof(float));
  float* x = aligned_alloc(64, (size_t)R * K * sizeof(float));
  float* out = aligned_alloc(64, (size_t)J * R * sizeof(float));
  for (size_t i = 0; i < (size_t)J * K; ++i) w[i] = 1e-3f * (float)(i % 7);
  for (size_t i = 0; i < (size_t)R * K; ++i) x[i] = 1e-3f * (float)(i % 5);
  const size_t slots = (size_t)J * R / LANES;
  double best = 1e30;
  for (int rep = 0; rep < 30; ++rep) {
    const double t0 = now();
    for (int j = 0; j < J; j += COLS) {
      const float* w0 = w + (size_t)j * K;
      for (int r0 = 0; r0 < R; r0 += ROWS) {
        vec acc[ROWS * COLS];
        memset(acc, 0, sizeof(acc));
        for (int k = 0; k < K; k += LANES) {
          vec a[COLS];
          for (int q = 0; q < COLS; ++q)
            a[q] = in_register(*(const vec*)(w0 + (size_t)q * K + k));
#pragma GCC unroll 4
          for (int r = 0; r < ROWS; ++r) {
            const vec b = *(const vec*)(x + (size_t)(r0 + r) * K + k);
            for (int q = 0; q < COLS; ++q) acc[r * COLS + q] += b * a[q];
          }
        }
        // Less than the kernels' fold of the accumulators into one vector
        // of sums (shuffles as well as additions): additions only, so that
        // the probe bounds the mix from above.
        for (int n = ROWS * COLS; n > 1; n = (n + 1) / 2)
          for (int i = 0; i < n / 2; ++i) acc[i] += acc[i + (n + 1) / 2];
        const size_t block = (size_t)(j / COLS) * (R / ROWS) + r0 / ROWS;
        memcpy(out + block % slots * LANES, &acc[0], sizeof(vec));
      }
    }
    const double dt = now() - t0;
    if (dt < best) best = dt;
  }
  const double macs = (double)J * K * R;
  printf("J %d K %d R %d (%.2f MB of weights; %d x %d blocks, %d-bit vectors): %.1f us a pass, "
         "%.1f GFMA/s (%g)\n",
         J, K, R, (double)J * K * sizeof(float) / 1e6, ROWS, COLS, VEC_BYTES * 8, best * 1e6,
         macs / best / 1e9, out[3]);
  free(w);
  free(x);
  free(out);
  return 0;
}
