// How fast one core reads a buffer of a given size over and over with the
// widest loads the compiler targets (512-bit with AVX-512, 256-bit with
// AVX2; eight independent sums, so that no add's latency limits it): the
// bandwidth from L2 or L3 that a call reading weights of that size once
// can have at best. Prints the best pass's GB/s and the load width.
//
//   gcc -O3 -march=native bench/probes/stream_loads.c -o /tmp/stream_loads
//   /tmp/stream_loads MB   (e.g. 1.57: an RNNCell 256->512's weights)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__)
#define VEC_BYTES 64
#elif defined(__AVX__)
#define VEC_BYTES 32
#else
#define VEC_BYTES 16
#endif
#define LANES (VEC_BYTES / 4)
typedef float vec __attribute__((vector_size(VEC_BYTES), may_alias));

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
  const size_t round = 8 * LANES;  // floats: 8 vectors a round
  const size_t n = ((size_t)(atof(argv[1]) * 1e6) / (round * sizeof(float)) + 1) * round;
  float* buf = aligned_alloc(64, n * sizeof(float));
  for (size_t i = 0; i < n; ++i) buf[i] = 1e-3f * (float)(i % 11);
  const int passes = n * sizeof(float) < (32u << 20) ? 200 : 20;
  double best = 1e30;
  vec s[8];
  memset(s, 0, sizeof(s));
  for (int rep = 0; rep < passes; ++rep) {
    const double t0 = now();
    for (size_t i = 0; i < n; i += round)
      for (int v = 0; v < 8; ++v) s[v] += *(const vec*)(buf + i + LANES * v);
    const double dt = now() - t0;
    if (dt < best) best = dt;
  }
  for (int i = 1; i < 8; ++i) s[0] += s[i];
  float total = 0;
  for (int l = 0; l < LANES; ++l) total += s[0][l];
  printf("%.2f MB: %.1f us a pass, %.1f GB/s (%d-bit loads; %g)\n", n * sizeof(float) / 1e6,
         best * 1e6, n * sizeof(float) / best / 1e9, VEC_BYTES * 8, total);
  free(buf);
  return 0;
}
