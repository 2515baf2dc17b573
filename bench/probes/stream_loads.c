// How fast one core reads a buffer of a given size over and over with
// 512-bit loads (eight independent sums, so that no add's latency limits
// it): the bandwidth from L2 or L3 that a call reading weights of that
// size once can have at best. Prints the best pass's GB/s.
//
//   gcc -O3 -march=native bench/probes/stream_loads.c -o /tmp/stream_loads
//   /tmp/stream_loads MB   (e.g. 1.57: an RNNCell 256->512's weights)
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
  if (argc != 2 || atof(argv[1]) <= 0) {
    fprintf(stderr, "usage: %s MB\n", argv[0]);
    return 2;
  }
  const size_t n = ((size_t)(atof(argv[1]) * 1e6) / 512 + 1) * 128;  // floats, 8 vectors a round
  float* buf = aligned_alloc(64, n * sizeof(float));
  for (size_t i = 0; i < n; ++i) buf[i] = 1e-3f * (float)(i % 11);
  const int passes = n * sizeof(float) < (32u << 20) ? 200 : 20;
  double best = 1e30;
  __m512 s[8];
  for (int i = 0; i < 8; ++i) s[i] = _mm512_setzero_ps();
  for (int rep = 0; rep < passes; ++rep) {
    const double t0 = now();
    for (size_t i = 0; i < n; i += 128)
      for (int v = 0; v < 8; ++v) s[v] = _mm512_add_ps(s[v], _mm512_load_ps(buf + i + 16 * v));
    const double dt = now() - t0;
    if (dt < best) best = dt;
  }
  for (int i = 1; i < 8; ++i) s[0] = _mm512_add_ps(s[0], s[i]);
  printf("%.2f MB: %.1f us a pass, %.1f GB/s (%g)\n", n * sizeof(float) / 1e6, best * 1e6,
         n * sizeof(float) / best / 1e9, _mm512_reduce_add_ps(s[0]));
  free(buf);
  return 0;
}
