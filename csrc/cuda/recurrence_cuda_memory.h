// Memory primitives of the kernel bodies: 16-byte loads and stores of
// shared and global memory (checked for alignment in the emulator), chunks
// of weights and states in A, loading a weight matrix into shared memory,
// zero fills, and the grid path's copy of exchanged rows.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda/recurrence_cuda_layout.h"
#include "cuda/recurrence_cuda_types.h"

namespace fastrnn {
namespace cuda {

// 16 bytes from p, 16-byte aligned: a vector load on the device; on the host
// (the emulator) the same bytes, after checking the alignment the device
// would need.
FASTRNN_HD void load16(const void* p, void* out) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(p);
#else
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    fprintf(stderr, "fastrnn: misaligned 16-byte load at %p\n", p);
    abort();
  }
  std::memcpy(out, p, 16);
#endif
}

// 16 bytes of the exchange buffer in global memory, past the
// multiprocessor's L1 cache (not coherent between multiprocessors).
FASTRNN_HD void store16(void* p, const void* v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
#else
  std::memcpy(p, v, 16);
#endif
}

FASTRNN_HD void load16_global_cg(const void* p, void* out) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(out) = __ldcg(reinterpret_cast<const uint4*>(p));
#else
  load16(p, out);
#endif
}

// A chunk of weights, converted to A.
template <typename A, typename Wt>
FASTRNN_HD void load_weights(const Wt* p, A (&out)[chunk<Wt>()]) {
  if constexpr (sizeof(Wt) == sizeof(A)) {
    load16(p, out);
  } else {
    Wt raw[chunk<Wt>()];
    load16(p, raw);
    FASTRNN_UNROLL
    for (int64_t l = 0; l < chunk<Wt>(); ++l) out[l] = to_acc(raw[l]);
  }
}

// A chunk of a state row in A: one or two 16-byte loads.
template <typename A, int64_t CE>
FASTRNN_HD void load_state(const A* p, A (&out)[CE]) {
  FASTRNN_UNROLL
  for (int64_t i = 0; i < CE * static_cast<int64_t>(sizeof(A)) / 16; ++i)
    load16(p + i * (16 / sizeof(A)), out + i * (16 / sizeof(A)));
}

// ---------------------------------------------------------------------------
// Loading weights into shared memory, once per kernel: rows [m0, m0 + nm)
// of a (M, K) matrix in global memory (row-major, T), columns [k0, k0 + nk)
// of each; with `transpose`, out[k * ld + m] = in[m][k], else out[m * ld +
// k]. Row m of the block lands at out row m - m0; columns from zero. 16-byte
// loads, one division each, where the block is contiguous (whole rows) or
// each row's columns are whole aligned vectors (a member's share of
// columns); one element at a time otherwise.
template <typename Wt, typename T>
FASTRNN_HD Wt to_smem_weight(T v) {
  if constexpr (sizeof(Wt) == sizeof(T)) return *reinterpret_cast<const Wt*>(&v);
  else return from_acc<Wt>(to_acc(v));
}

template <typename T, typename Wt, class Block>
FASTRNN_HD void load_matrix(const T* in, int64_t K, int64_t m0, int64_t nm, int64_t k0,
                            int64_t nk, bool transpose, Wt* out, int64_t ld, const Block& b) {
  constexpr int64_t V = 16 / sizeof(T);
  const T* base = in + m0 * K + k0;
  const int64_t total = nm * nk;
  auto put = [&](int64_t m, int64_t k, T v) {
    out[transpose ? k * ld + m : m * ld + k] = to_smem_weight<Wt>(v);
  };
  const bool aligned = reinterpret_cast<uintptr_t>(base) % 16 == 0;
  int64_t whole = 0;  // elements loaded by vectors, in the order of the block
  if (aligned && nk == K) {
    // Whole rows are one contiguous block: the vectors, then the elements
    // past the last of them.
    whole = total / V * V;
    for (int64_t e = b.tid * V; e < whole; e += b.threads * V) {
      T raw[V];
      load16(base + e, raw);
      const DivMod mk = divmod(e, nk);
      int64_t m = mk.q, k = mk.r;
      FASTRNN_UNROLL
      for (int64_t l = 0; l < V; ++l) {
        put(m, k, raw[l]);
        if (++k == nk) {
          k = 0;
          ++m;
        }
      }
    }
  } else if (aligned && K % V == 0 && nk % V == 0) {
    // Each row's columns are whole vectors, each row 16-byte aligned.
    const int64_t per_row = nk / V;
    whole = total;
    for (int64_t v = b.tid; v < nm * per_row; v += b.threads) {
      const DivMod mv = divmod(v, per_row);
      T raw[V];
      load16(base + mv.q * K + mv.r * V, raw);
      FASTRNN_UNROLL
      for (int64_t l = 0; l < V; ++l) put(mv.q, mv.r * V + l, raw[l]);
    }
  }
  for (int64_t e = whole + b.tid; e < total; e += b.threads) {
    const DivMod mk = divmod(e, nk);
    put(mk.q, mk.r, base[mk.q * K + mk.r]);
  }
}

// Zeros n elements at p (the padding of shared-memory rows).
template <typename E, class Block>
FASTRNN_HD void zero_fill(E* p, int64_t n, const Block& b) {
  for (int64_t i = b.tid; i < n; i += b.threads) p[i] = from_acc<E>(typename AccOf<E>::type(0));
}

// Rows [n0, n0 + R) of one buffer of the exchange (rows of width S, A) into
// shared memory (R, S): all of a thread's 16-byte loads before its stores.
template <typename A, class Block>
FASTRNN_HD void gather_rows(const A* from, A* to, int64_t R, int64_t S, const Block& b) {
  constexpr int64_t V = 16 / sizeof(A), kBatch = 4;
  const int64_t vectors = R * S / V;
  for (int64_t v0 = b.tid; v0 < vectors; v0 += kBatch * b.threads) {
    A buf[kBatch][V] = {};
    FASTRNN_UNROLL
    for (int64_t k = 0; k < kBatch; ++k) {
      const int64_t v = v0 + k * b.threads;
      if (v < vectors) load16_global_cg(from + v * V, buf[k]);
    }
    FASTRNN_UNROLL
    for (int64_t k = 0; k < kBatch; ++k) {
      const int64_t v = v0 + k * b.threads;
      if (v < vectors) store16(to + v * V, buf[k]);
    }
  }
}

}  // namespace cuda
}  // namespace fastrnn
