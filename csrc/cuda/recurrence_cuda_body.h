// The bodies of the CUDA time-loop kernels, written once for every cell and
// for two callers: the __global__ kernels in recurrence_cuda_kernels.cuh,
// and the emulator in recurrence_cuda_emulate.cpp, which runs the same code
// on CPU threads (one per CUDA thread) so that the tests check the kernels'
// indexing, shared-memory layout, synchronisation and the grid path's own
// barrier on machines without a GPU. The launch geometry every body assumes
// comes from one descriptor (recurrence_cuda_paths.h), used by the device
// launchers and the emulator alike.
//
// A body sees its block through `b`: b.tid and b.threads (threadIdx.x and
// blockDim.x), b.sync() (__syncthreads), b.sync_or(v) (__syncthreads_or:
// whether v held in any thread of the block), b.lane_sum(v, S) (the sum of v
// over the S lanes of an aligned group of a warp, by shuffles), b.spin()
// (once per turn of a wait loop).
// Cluster members also have b.rank,
// b.size, b.peer(q) (member q's shared memory) and b.cluster_sync(); grid
// group members b.rank, b.size and b.counter (their group's barrier
// counter), b.abort (the launch's abort flag) and b.timeout_ns.
//
// Arithmetic runs in the accumulation type A (float, or double for double);
// the states are carried in it too, so half and bfloat16 round only what
// they store. W_hh sits in shared memory in the storage type for half and
// bfloat16 (twice the hidden size per block), in A otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if defined(__CUDA_ARCH__)
#include <cuda/atomic>
#else
#include <atomic>
#include <chrono>
#include <cstring>
#include <type_traits>
#endif

#include "cells.h"
#include "recurrence_params.h"

#if defined(__CUDA_ARCH__)
#define FASTRNN_UNROLL _Pragma("unroll")
#else
#define FASTRNN_UNROLL
#endif

namespace fastrnn {
namespace cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// The type W_hh is kept in shared memory.
template <typename T>
struct SmemWeightOf {
  using type = typename AccOf<T>::type;
};
template <>
struct SmemWeightOf<__half> {
  using type = __half;
};
template <>
struct SmemWeightOf<__nv_bfloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
FASTRNN_HD typename AccOf<T>::type to_acc(T v) {
  return static_cast<typename AccOf<T>::type>(v);
}
template <>
FASTRNN_HD float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
FASTRNN_HD float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename A>
FASTRNN_HD T from_acc(A v) {
  return static_cast<T>(v);
}
template <>
FASTRNN_HD __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
FASTRNN_HD __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// The cells' math on one unit in A (cells.h).
template <typename A>
struct ScalarMath {
  using S = A;
  static FASTRNN_HD A tanh(A x) {
    if constexpr (sizeof(A) == 4) return tanhf(x);
    else return ::tanh(x);
  }
  // 1 / (1 + exp(-x)): 0 at -inf, 1 at inf, NaN kept.
  static FASTRNN_HD A sigmoid(A x) {
    if constexpr (sizeof(A) == 4) return 1.f / (1.f + expf(-x));
    else return 1.0 / (1.0 + ::exp(-x));
  }
  // `x < 0 ? 0 : x` keeps NaN, as torch.relu does.
  static FASTRNN_HD A relu(A x) { return x < A(0) ? A(0) : x; }
  // torch's threshold_backward: zero where the output is <= 0.
  static FASTRNN_HD A relu_backward(A g, A h) { return h <= A(0) ? A(0) : g; }
};

// ---------------------------------------------------------------------------
// Shared-memory layout. A dot product reads 16 bytes of weights at a time
// (a chunk: 4 floats, 2 doubles or 8 halves) and the matching chunk of a
// state row in A. State rows are padded to whole chunks (row_stride) with
// zeros, so that a dot product needs no tail; weight rows also to an odd
// number of 16-byte units (weight_stride), so that the eight threads of a
// warp that share a 128-byte access phase, each on its own row, land on
// distinct banks.

template <typename Wt>
FASTRNN_HD constexpr int64_t chunk() {
  return 16 / static_cast<int64_t>(sizeof(Wt));
}
template <typename Wt>
FASTRNN_HD int64_t row_stride(int64_t n) {
  return (n + chunk<Wt>() - 1) / chunk<Wt>() * chunk<Wt>();
}
template <typename Wt>
FASTRNN_HD int64_t weight_stride(int64_t n) {
  const int64_t s = row_stride<Wt>(n);
  return (s / chunk<Wt>()) % 2 == 1 ? s : s + chunk<Wt>();
}

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

// A thread group of up to kRowTile batch rows: each weight chunk a lane
// loads serves that many rows, which is what bounds a step once a block
// holds several rows (shared memory delivers 128 bytes a cycle).
constexpr int kRowTile = 4;

FASTRNN_HD int64_t row_tiles(int64_t R) { return (R + kRowTile - 1) / kRowTile; }
FASTRNN_HD int64_t tile_rows(int64_t r0, int64_t R) { return R - r0 < kRowTile ? R - r0 : kRowTile; }

// Partial dot products of the nr rows of x (stride xs, A) with one weight
// row w (Wt), over the chunks first, first + step, ... below chunks. Added
// to out[q] for q < nr.
template <typename A, typename Wt>
FASTRNN_HD void dot_chunks(const A* x, int64_t xs, int64_t nr, const Wt* w, int64_t chunks,
                           int64_t first, int64_t step, A (&out)[kRowTile]) {
  constexpr int64_t CE = chunk<Wt>();
  A acc[kRowTile][CE];
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q)
    FASTRNN_UNROLL
    for (int64_t l = 0; l < CE; ++l) acc[q][l] = A(0);
  for (int64_t ch = first; ch < chunks; ch += step) {
    A wv[CE];
    load_weights<A>(w + ch * CE, wv);
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= nr) break;
      A xv[CE];
      load_state<A, CE>(x + q * xs + ch * CE, xv);
      FASTRNN_UNROLL
      for (int64_t l = 0; l < CE; ++l) acc[q][l] += xv[l] * wv[l];
    }
  }
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q) {
    A sum = acc[q][0];
    FASTRNN_UNROLL
    for (int64_t l = 1; l < CE; ++l) sum += acc[q][l];
    out[q] += sum;
  }
}

// i / n and i % n for the indices of the per-step loops, which index a
// block's shared memory (far below 2^32): in 32 bits, a fraction of the cost
// of a 64-bit division on the device.
struct DivMod {
  int64_t q, r;
};
FASTRNN_HD DivMod divmod(int64_t i, int64_t n) {
  const uint32_t a = static_cast<uint32_t>(i), b = static_cast<uint32_t>(n), q = a / b;
  return DivMod{q, a - q * b};
}

// Rows of the block that starts at batch row n0: `rows`, fewer in the last.
FASTRNN_HD int64_t rows_in_block(int64_t n0, int64_t rows, int64_t N) {
  return rows < N - n0 ? rows : N - n0;
}

// ---------------------------------------------------------------------------
// Work of a block. An item is a tile of up to kRowTile rows and one unit (or
// column) of the block's share; `split` lanes of a warp share an item,
// splitting its dot products by chunks and adding their parts with
// b.lane_sum. Every thread runs the same number of rounds (lanes past the
// last item too), so that every lane of a warp reaches every shuffle. The
// lane 0 of an item's group owns it: it alone writes what the item computes,
// in every loop of a kernel, so the elements an item owns need no barrier
// from one step to the next.
struct Items {
  int64_t R;      // rows of the block
  int64_t units;  // units (columns) of the block's share
  int64_t split;  // lanes per item
  FASTRNN_HD int64_t count() const { return row_tiles(R) * units; }
  template <class Block>
  FASTRNN_HD int64_t groups(const Block& b) const { return b.threads / split; }
  template <class Block>
  FASTRNN_HD int64_t rounds(const Block& b) const {
    return (count() + groups(b) - 1) / groups(b);
  }
};

struct Item {
  bool valid;
  int64_t r0, nr, c;  // first row, rows, unit of the share
  int64_t lane;       // lane within the item's group
};

template <class Block>
FASTRNN_HD Item item_of(const Items& it, int64_t round, const Block& b) {
  const int64_t i = round * it.groups(b) + b.tid / it.split;
  Item x;
  x.lane = b.tid - (b.tid / it.split) * it.split;
  x.valid = i < it.count();  // never for a member without units (units 0)
  const DivMod tc = divmod(x.valid ? i : 0, it.units > 0 ? it.units : 1);
  x.r0 = tc.q * kRowTile;
  x.c = tc.r;
  x.nr = tile_rows(x.r0, it.R);
  return x;
}

// ---------------------------------------------------------------------------
// Loading weights into shared memory, once per kernel: rows [m0, m0 + nm)
// of a (M, K) matrix in global memory (row-major, T), columns [k0, k0 + nk)
// of each; with `transpose`, out[k * ld + m] = in[m][k], else out[m * ld +
// k]. Row m of the block lands at out row m - m0; columns from zero. 16-byte
// loads where the block is contiguous and aligned.
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
  auto put = [&](int64_t e, T v) {
    const DivMod mk = divmod(e, nk);
    out[transpose ? mk.r * ld + mk.q : mk.q * ld + mk.r] = to_smem_weight<Wt>(v);
  };
  // Whole rows are one contiguous block: 16 bytes at a time, one division
  // per 16 bytes, then the elements past the last whole vector.
  const bool vec = nk == K && reinterpret_cast<uintptr_t>(base) % 16 == 0;
  const int64_t whole = vec ? total / V * V : 0;
  for (int64_t e = b.tid * V; e < whole; e += b.threads * V) {
    T raw[V];
    load16(base + e, raw);
    FASTRNN_UNROLL
    for (int64_t l = 0; l < V; ++l) put(e + l, raw[l]);
  }
  for (int64_t e = whole + b.tid; e < total; e += b.threads) {
    const DivMod mk = divmod(e, nk);
    put(e, base[mk.q * K + mk.r]);
  }
}

// Zeros n elements at p (the padding of shared-memory rows).
template <typename E, class Block>
FASTRNN_HD void zero_fill(E* p, int64_t n, const Block& b) {
  for (int64_t i = b.tid; i < n; i += b.threads) p[i] = from_acc<E>(typename AccOf<E>::type(0));
}

// ---------------------------------------------------------------------------
// The forward of the persistent, cluster and grid paths. A block owns rows
// [n0, n0 + R) of direction d and the units [j0, j0 + nj) of its share (all
// H of them on the persistent path); w holds, for each gate g and each unit
// c of the share, the row W_hh[g*H + j0 + c] (stride Wst: row g * nj_stride
// + c); state (R, Ss) holds h of the previous step, every unit; cs (R, csw)
// the share's cell states (kCellState). publish(r, j, v) hands on the new
// state of unit j of row r.

template <typename A, typename Cell>
struct UnitInputs {
  A u[Cell::kGates][kRowTile];
};

// What the cell adds to the input term of gate g, unit j: b_ih, and b_hh
// unless the cell keeps it apart (kHiddenBias); zero without biases.
template <typename Cell, typename T>
FASTRNN_HD typename AccOf<T>::type input_bias(const ForwardParams<T>& p, int64_t d, int64_t m) {
  using A = typename AccOf<T>::type;
  if (p.b_ih[d] == nullptr) return A(0);
  return Cell::kHiddenBias ? to_acc(p.b_ih[d][m]) : to_acc(p.b_ih[d][m]) + to_acc(p.b_hh[d][m]);
}

// b_hh of gate g, unit j, for the kHiddenBias cells (zero for the others).
template <typename Cell, typename T>
FASTRNN_HD typename AccOf<T>::type hidden_bias(const ForwardParams<T>& p, int64_t d, int64_t m) {
  using A = typename AccOf<T>::type;
  return Cell::kHiddenBias && p.b_hh[d] != nullptr ? to_acc(p.b_hh[d][m]) : A(0);
}

// The input terms of an item's rows at step t, for its lane 0 (zero for
// the other lanes, which never read them).
template <typename Cell, typename T>
FASTRNN_HD void load_inputs(const ForwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                            const Item& x, int64_t j0,
                            UnitInputs<typename AccOf<T>::type, Cell>& in) {
  using A = typename AccOf<T>::type;
  const int64_t GH = Cell::kGates * p.H, j = j0 + x.c;
  A bias[Cell::kGates];
  FASTRNN_UNROLL
  for (int g = 0; g < Cell::kGates; ++g)
    bias[g] = x.valid && x.lane == 0 ? input_bias<Cell>(p, d, g * p.H + j) : A(0);
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q) {
    const bool ok = x.valid && x.lane == 0 && q < x.nr;
    const T* u = p.u + ((d * p.T + t) * p.N + n0 + x.r0 + q) * GH + j;
    FASTRNN_UNROLL
    for (int g = 0; g < Cell::kGates; ++g) in.u[g][q] = ok ? to_acc(u[g * p.H]) + bias[g] : A(0);
  }
}

template <typename Cell, typename T, typename Wt, class Block, class Publish>
FASTRNN_HD void forward_items(const ForwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                              const Items& it, int64_t j0, int64_t nj_stride, const Wt* w,
                              int64_t Wst, const typename AccOf<T>::type* state, int64_t Ss,
                              typename AccOf<T>::type* cs, int64_t csw,
                              UnitInputs<typename AccOf<T>::type, Cell>& ahead, int64_t t_next,
                              const Block& b, const Publish& publish) {
  using A = typename AccOf<T>::type;
  constexpr int G = Cell::kGates;
  const int64_t H = p.H, chunks = Ss / chunk<Wt>();
  const int64_t rounds = it.rounds(b);
  for (int64_t round = 0; round < rounds; ++round) {
    const Item x = item_of(it, round, b);
    UnitInputs<A, Cell> in;
    if (round == 0) in = ahead;
    else load_inputs<Cell>(p, t, d, n0, x, j0, in);
    // The next step's input terms of the first item, loaded now so that
    // their trip to global memory overlaps this step's arithmetic.
    if (round == 0 && t_next >= 0 && x.lane == 0) load_inputs<Cell>(p, t_next, d, n0, x, j0, ahead);
    A hw[G][kRowTile];
    FASTRNN_UNROLL
    for (int g = 0; g < G; ++g) {
      FASTRNN_UNROLL
      for (int q = 0; q < kRowTile; ++q) hw[g][q] = A(0);
      if (x.valid)
        dot_chunks<A>(state + x.r0 * Ss, Ss, x.nr, w + (g * nj_stride + x.c) * Wst, chunks,
                      x.lane, it.split, hw[g]);
      FASTRNN_UNROLL
      for (int q = 0; q < kRowTile; ++q) hw[g][q] = b.lane_sum(hw[g][q], it.split);
    }
    if (!x.valid || x.lane != 0) continue;
    const int64_t j = j0 + x.c;
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= x.nr) break;
      const int64_t r = x.r0 + q, n = n0 + r;
      T* out = p.y + (t * p.N + n) * p.D * p.P + d * p.P + j;
      T* saved = saved_width<Cell>(H) ? p.saved + ((d * p.T + t) * p.N + n) * saved_width<Cell>(H) + j
                                      : nullptr;
      A v;
      if (row_active(p.lengths, n, t)) {
        A u[G], hwq[G], bh[G], sv[Cell::kSaved > 0 ? Cell::kSaved : 1];
        FASTRNN_UNROLL
        for (int g = 0; g < G; ++g) {
          u[g] = in.u[g][q];
          hwq[g] = hw[g][q];
          bh[g] = hidden_bias<Cell>(p, d, g * H + j);
        }
        A c = Cell::kCellState ? cs[r * csw + x.c] : A(0);
        Cell::template forward<ScalarMath<A>, A>(u, hwq, bh, state[r * Ss + j], c, v, sv);
        *out = from_acc<T>(v);
        FASTRNN_UNROLL
        for (int k = 0; k < Cell::kSaved; ++k) saved[k * H] = from_acc<T>(sv[k]);
        if constexpr (Cell::kCellState) {
          cs[r * csw + x.c] = c;
          saved[Cell::kSaved * H] = from_acc<T>(c);
        }
      } else {
        v = state[r * Ss + j];
        *out = from_acc<T>(A(0));
        for (int k = 0; k < Cell::kSaved + (Cell::kCellState ? 1 : 0); ++k)
          saved[k * H] = from_acc<T>(A(0));
      }
      publish(r, j, v);
    }
  }
}

// The first step's input terms of this thread's first item.
template <typename Cell, typename T, class Block>
FASTRNN_HD void first_inputs(const ForwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                             const Items& it, int64_t j0,
                             UnitInputs<typename AccOf<T>::type, Cell>& ahead, const Block& b) {
  load_inputs<Cell>(p, t, d, n0, item_of(it, 0, b), j0, ahead);
}

// h0 of rows [n0, n0 + R) into state (R, Ss), every unit, padding zero; the
// share's c0 into cs (R, csw).
template <typename Cell, typename T, class Block>
FASTRNN_HD void load_initial_state(const ForwardParams<T>& p, int64_t d, int64_t n0, int64_t R,
                                   typename AccOf<T>::type* state, int64_t Ss,
                                   typename AccOf<T>::type* cs, int64_t csw, int64_t j0,
                                   int64_t nj, const Block& b) {
  using A = typename AccOf<T>::type;
  for (int64_t i = b.tid; i < R * Ss; i += b.threads) {
    const DivMod rk = divmod(i, Ss);
    state[i] = rk.r < p.P ? to_acc(p.h0[(d * p.N + n0 + rk.q) * p.P + rk.r]) : A(0);
  }
  if constexpr (Cell::kCellState) {
    for (int64_t i = b.tid; i < R * nj; i += b.threads) {
      const DivMod rc = divmod(i, nj);
      cs[rc.q * csw + rc.r] = to_acc(p.c0[(d * p.N + n0 + rc.q) * p.H + j0 + rc.r]);
    }
  }
}

// h_n (and c_n) of the share's units from state (R, Ss) and cs (R, csw).
template <typename Cell, typename T, class Block>
FASTRNN_HD void store_final_state(const ForwardParams<T>& p, int64_t d, int64_t n0, int64_t R,
                                  const typename AccOf<T>::type* state, int64_t Ss,
                                  const typename AccOf<T>::type* cs, int64_t csw, int64_t j0,
                                  int64_t nj, const Block& b) {
  for (int64_t i = b.tid; i < R * nj; i += b.threads) {
    const DivMod rc = divmod(i, nj);
    const int64_t o = (d * p.N + n0 + rc.q) * p.H + j0 + rc.r;
    p.hn[o] = from_acc<T>(state[rc.q * Ss + j0 + rc.r]);
    if constexpr (Cell::kCellState) p.cn[o] = from_acc<T>(cs[rc.q * csw + rc.r]);
  }
}

// ---------------------------------------------------------------------------
// The backward of the persistent, cluster and grid paths, two phases a step.
// Phase 1 (dz_items): for each item of the share, the cell's backward step
// from dL/dh' = dy + dh: dgh (and dgi) into global memory, dgh handed to
// publish(r, m, v) for the carry, dc kept, dh replaced by the part of
// dL/dh_prev outside W_hh. Phase 2 (carry_items), after a barrier that
// makes dz complete: dh[r][c] += dz[r] . W_hh[:, k0 + c] over all G*H.

template <typename A, typename Cell>
struct GradInputs {
  A dy[kRowTile], y[kRowTile];
  A saved[Cell::kSaved > 0 ? Cell::kSaved : 1][kRowTile];
  A c[kRowTile], c_prev[kRowTile], h_prev[kRowTile];
};

template <typename Cell, typename T>
FASTRNN_HD void load_grad_inputs(const BackwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                                 const Item& x, int64_t j0,
                                 GradInputs<typename AccOf<T>::type, Cell>& in) {
  using A = typename AccOf<T>::type;
  const int64_t N = p.N, H = p.H, DP = p.D * p.P, Ws = saved_width<Cell>(H), j = j0 + x.c;
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q) {
    const int64_t n = n0 + x.r0 + q;
    const bool ok = x.valid && x.lane == 0 && q < x.nr && row_active(p.lengths, n, t);
    const int64_t o = (t * N + n) * DP + d * p.P + j;
    in.dy[q] = ok ? to_acc(p.dy[o]) : A(0);
    in.y[q] = ok ? to_acc(p.y[o]) : A(0);
    const T* saved = Ws ? p.saved + ((d * p.T + t) * N + n) * Ws + j : nullptr;
    FASTRNN_UNROLL
    for (int k = 0; k < Cell::kSaved; ++k) in.saved[k][q] = ok ? to_acc(saved[k * H]) : A(0);
    const int64_t prev = ok ? prev_step(p.lengths, n, t, d, p.T) : -1;
    if constexpr (Cell::kCellState) {
      in.c[q] = ok ? to_acc(saved[Cell::kSaved * H]) : A(0);
      in.c_prev[q] = !ok ? A(0)
                     : prev >= 0 ? to_acc(p.saved[((d * p.T + prev) * N + n) * Ws + Cell::kSaved * H + j])
                                 : to_acc(p.c0[(d * N + n) * H + j]);
    }
    if constexpr (Cell::kPrevState) {
      in.h_prev[q] = !ok ? A(0)
                     : prev >= 0 ? to_acc(p.y[(prev * N + n) * DP + d * p.P + j])
                                 : to_acc(p.h0[(d * N + n) * p.P + j]);
    }
  }
}

template <typename Cell, typename T, class Block, class Publish>
FASTRNN_HD void dz_items(const BackwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                         const Items& it, int64_t j0, typename AccOf<T>::type* dh, int64_t dhs,
                         typename AccOf<T>::type* dc, int64_t dcs,
                         GradInputs<typename AccOf<T>::type, Cell>& ahead, int64_t t_next,
                         const Block& b, const Publish& publish) {
  using A = typename AccOf<T>::type;
  constexpr int G = Cell::kGates;
  const int64_t H = p.H, GH = G * H;
  const int64_t rounds = it.rounds(b);
  for (int64_t round = 0; round < rounds; ++round) {
    const Item x = item_of(it, round, b);
    if (!x.valid || x.lane != 0) continue;
    GradInputs<A, Cell> in;
    if (round == 0) in = ahead;
    else load_grad_inputs<Cell>(p, t, d, n0, x, j0, in);
    const int64_t j = j0 + x.c;
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= x.nr) break;
      const int64_t r = x.r0 + q, n = n0 + r;
      const int64_t o = ((d * p.T + t) * p.N + n) * GH + j;
      if (!row_active(p.lengths, n, t)) {
        FASTRNN_UNROLL
        for (int g = 0; g < G; ++g) {
          p.dgh[o + g * H] = from_acc<T>(A(0));
          if (Cell::kHiddenBias) p.dgi[o + g * H] = from_acc<T>(A(0));
          publish(r, g * H + j, A(0));
        }
        continue;
      }
      A sv[Cell::kSaved > 0 ? Cell::kSaved : 1], dgh[G], dgi[G], dhd = A(0);
      FASTRNN_UNROLL
      for (int k = 0; k < Cell::kSaved; ++k) sv[k] = in.saved[k][q];
      A dcv = Cell::kCellState ? dc[r * dcs + x.c] : A(0);
      Cell::template backward<ScalarMath<A>, A>(in.dy[q] + dh[r * dhs + x.c], in.y[q], sv,
                                                in.h_prev[q], in.c_prev[q], in.c[q], dcv, dgh,
                                                dgi, dhd);
      FASTRNN_UNROLL
      for (int g = 0; g < G; ++g) {
        p.dgh[o + g * H] = from_acc<T>(dgh[g]);
        if (Cell::kHiddenBias) p.dgi[o + g * H] = from_acc<T>(dgi[g]);
        publish(r, g * H + j, dgh[g]);
      }
      if (Cell::kCellState) dc[r * dcs + x.c] = dcv;
      dh[r * dhs + x.c] = dhd;
    }
  }
  // The next step's inputs of the first item, ahead of the carry's arithmetic.
  const Item first = item_of(it, 0, b);
  if (t_next >= 0 && first.lane == 0) load_grad_inputs<Cell>(p, t_next, d, n0, first, j0, ahead);
}

// dh[r][c] += z[r] . wt[c] for the share's columns and the rows active at t:
// z (R, Ms) holds dgh of every gate and unit, wt (nk, Mst) the share's
// columns of W_hh (wt[c][m] = W_hh[m][k0 + c]).
template <typename A, typename Wt, class Block>
FASTRNN_HD void carry_items(const int64_t* lengths, int64_t t, int64_t n0, const Items& it,
                            const A* z, int64_t Ms, const Wt* wt, int64_t Mst, A* dh,
                            int64_t dhs, const Block& b) {
  const int64_t chunks = Ms / chunk<Wt>();
  const int64_t rounds = it.rounds(b);
  for (int64_t round = 0; round < rounds; ++round) {
    const Item x = item_of(it, round, b);
    A s[kRowTile] = {};
    if (x.valid) dot_chunks<A>(z + x.r0 * Ms, Ms, x.nr, wt + x.c * Mst, chunks, x.lane, it.split, s);
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) s[q] = b.lane_sum(s[q], it.split);
    if (!x.valid || x.lane != 0) continue;
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= x.nr) break;
      if (row_active(lengths, n0 + x.r0 + q, t)) dh[(x.r0 + q) * dhs + x.c] += s[q];
    }
  }
}

// dh_n (and dc_n) of the share into dh (R, dhs) and dc (R, dcs), by the
// threads that own them; and dh0 (dc0) back out.
template <typename Cell, typename T, class Block>
FASTRNN_HD void load_final_grads(const BackwardParams<T>& p, int64_t d, int64_t n0,
                                 const Items& it, int64_t k0, typename AccOf<T>::type* dh,
                                 int64_t dhs, typename AccOf<T>::type* dc, int64_t dcs,
                                 const Block& b) {
  using A = typename AccOf<T>::type;
  for (int64_t round = 0; round < it.rounds(b); ++round) {
    const Item x = item_of(it, round, b);
    if (!x.valid || x.lane != 0) continue;
    for (int64_t q = 0; q < x.nr; ++q) {
      const int64_t r = x.r0 + q, n = n0 + r;
      dh[r * dhs + x.c] = p.dhn != nullptr ? to_acc(p.dhn[(d * p.N + n) * p.P + k0 + x.c]) : A(0);
      if constexpr (Cell::kCellState)
        dc[r * dcs + x.c] = p.dcn != nullptr ? to_acc(p.dcn[(d * p.N + n) * p.H + k0 + x.c]) : A(0);
    }
  }
}

template <typename Cell, typename T, class Block>
FASTRNN_HD void store_initial_grads(const BackwardParams<T>& p, int64_t d, int64_t n0,
                                    const Items& it, int64_t k0,
                                    const typename AccOf<T>::type* dh, int64_t dhs,
                                    const typename AccOf<T>::type* dc, int64_t dcs,
                                    const Block& b) {
  for (int64_t round = 0; round < it.rounds(b); ++round) {
    const Item x = item_of(it, round, b);
    if (!x.valid || x.lane != 0) continue;
    for (int64_t q = 0; q < x.nr; ++q) {
      const int64_t r = x.r0 + q, n = n0 + r;
      p.dh0[(d * p.N + n) * p.P + k0 + x.c] = from_acc<T>(dh[r * dhs + x.c]);
      if constexpr (Cell::kCellState)
        p.dc0[(d * p.N + n) * p.H + k0 + x.c] = from_acc<T>(dc[r * dcs + x.c]);
    }
  }
}

// ---------------------------------------------------------------------------
// The geometry of a launch, as recurrence_cuda_paths.h computes it and every
// body reads it: rows per block, blocks per cluster or grid group, lanes per
// item.
struct Geometry {
  int64_t rows;
  int64_t size;
  int64_t split;
};

// The share of member q of a cluster or grid group of `size`: units [q * Hc,
// q * Hc + owned_units), Hc = ceil(H / size), fewer or none at the end.
FASTRNN_HD int64_t share_units(int64_t H, int64_t size) { return (H + size - 1) / size; }
FASTRNN_HD int64_t owned_units(int64_t H, int64_t size, int64_t q) {
  const int64_t Hc = share_units(H, size), c0 = q * Hc;
  return c0 >= H ? 0 : (c0 + Hc <= H ? Hc : H - c0);
}

// The shared memory of each kernel, in bytes, and where each array starts
// (16-byte aligned for those read 16 bytes at a time). Forward: w, state
// (1 or 2 buffers), cs; backward: wt, z (1 or 2 buffers), dh, dc.
template <typename Cell, typename T>
struct SmemLayout {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  int64_t w, state, cs, bytes;          // forward offsets
  int64_t wt, z, dh, dc;                // backward offsets
  int64_t Wst, Ss, Mst, Ms;             // strides
  int64_t units;                        // the share's units
  FASTRNN_HD static SmemLayout forward(int64_t H, int64_t P, int64_t rows, int64_t share,
                                       int64_t state_buffers) {
    SmemLayout l{};
    l.units = share;
    l.Wst = weight_stride<Wt>(P);
    l.Ss = row_stride<Wt>(P);
    l.w = 0;
    l.state = Cell::kGates * share * l.Wst * static_cast<int64_t>(sizeof(Wt));
    l.cs = l.state + state_buffers * rows * l.Ss * static_cast<int64_t>(sizeof(A));
    l.bytes = l.cs + (Cell::kCellState ? rows * share * static_cast<int64_t>(sizeof(A)) : 0);
    return l;
  }
  FASTRNN_HD static SmemLayout backward(int64_t H, int64_t rows, int64_t share,
                                        int64_t z_buffers) {
    SmemLayout l{};
    const int64_t GH = Cell::kGates * H;
    l.units = share;
    l.Mst = weight_stride<Wt>(GH);
    l.Ms = row_stride<Wt>(GH);
    l.wt = 0;
    l.z = share * l.Mst * static_cast<int64_t>(sizeof(Wt));
    l.dh = l.z + z_buffers * rows * l.Ms * static_cast<int64_t>(sizeof(A));
    l.dc = l.dh + rows * share * static_cast<int64_t>(sizeof(A));
    l.bytes = l.dc + (Cell::kCellState ? rows * share * static_cast<int64_t>(sizeof(A)) : 0);
    return l;
  }
};

// ---------------------------------------------------------------------------
// Persistent path: block (bx, d) owns batch rows [bx * rows, ...) of
// direction d and all H units; all T steps; W_hh and the rows' state in
// shared memory; blocks never wait for each other.

template <typename Cell, typename T, class Block>
FASTRNN_HD void forward_persistent_body(const ForwardParams<T>& p, const Geometry& g, int64_t bx,
                                        int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H;
  const auto l = SmemLayout<Cell, T>::forward(H, p.P, g.rows, H, 2);
  const int64_t n0 = bx * g.rows, R = rows_in_block(n0, g.rows, p.N);
  Wt* w = reinterpret_cast<Wt*>(smem + l.w);       // (G*H, Wst): rows of W_hh
  A* state = reinterpret_cast<A*>(smem + l.state);  // (2, rows, Ss)
  A* cs = reinterpret_cast<A*>(smem + l.cs);        // (rows, H)
  const Items it{R, H, g.split};
  zero_fill(w, Cell::kGates * H * l.Wst, b);
  zero_fill(state, 2 * g.rows * l.Ss, b);
  b.sync();
  load_matrix(p.w_hh[d], p.P, 0, Cell::kGates * H, 0, p.P, false, w, l.Wst, b);
  load_initial_state<Cell>(p, d, n0, R, state, l.Ss, cs, H, 0, H, b);
  UnitInputs<A, Cell> ahead;
  first_inputs<Cell>(p, d == 0 ? 0 : T_ - 1, d, n0, it, 0, ahead, b);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const int64_t t_next = s + 1 < T_ ? (d == 0 ? s + 1 : T_ - 2 - s) : -1;
    const A* prev = state + (s & 1) * g.rows * l.Ss;
    A* next = state + ((s + 1) & 1) * g.rows * l.Ss;
    forward_items<Cell>(p, t, d, n0, it, 0, H, w, l.Wst, prev, l.Ss, cs, H, ahead, t_next, b,
                        [&](int64_t r, int64_t j, A v) { next[r * l.Ss + j] = v; });
    b.sync();
  }
  store_final_state<Cell>(p, d, n0, R, state + (T_ & 1) * g.rows * l.Ss, l.Ss, cs, H, 0, H, b);
}

template <typename Cell, typename T, class Block>
FASTRNN_HD void backward_persistent_body(const BackwardParams<T>& p, const Geometry& g,
                                         int64_t bx, int64_t d, unsigned char* smem,
                                         const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, GH = Cell::kGates * H;
  const auto l = SmemLayout<Cell, T>::backward(H, g.rows, H, 2);
  const int64_t n0 = bx * g.rows, R = rows_in_block(n0, g.rows, p.N);
  Wt* wt = reinterpret_cast<Wt*>(smem + l.wt);  // (H, Mst): wt[k][m] = W_hh[m][k]
  A* z = reinterpret_cast<A*>(smem + l.z);      // (2, rows, Ms): dgh of the step
  A* dh = reinterpret_cast<A*>(smem + l.dh);    // (rows, H)
  A* dc = reinterpret_cast<A*>(smem + l.dc);    // (rows, H)
  const Items it{R, H, g.split};
  const auto time = [&](int64_t s) { return d == 0 ? T_ - 1 - s : s; };
  zero_fill(wt, H * l.Mst, b);
  zero_fill(z, 2 * g.rows * l.Ms, b);
  b.sync();
  load_matrix(p.w_hh[d], p.P, 0, GH, 0, p.P, true, wt, l.Mst, b);
  load_final_grads<Cell>(p, d, n0, it, 0, dh, H, dc, H, b);
  GradInputs<A, Cell> ahead;
  load_grad_inputs<Cell>(p, time(0), d, n0, item_of(it, 0, b), 0, ahead);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = time(s);
    A* zs = z + (s & 1) * g.rows * l.Ms;
    dz_items<Cell>(p, t, d, n0, it, 0, dh, H, dc, H, ahead, s + 1 < T_ ? time(s + 1) : -1, b,
                   [&](int64_t r, int64_t m, A v) { zs[r * l.Ms + m] = v; });
    b.sync();
    carry_items(p.lengths, t, n0, it, zs, l.Ms, wt, l.Mst, dh, H, b);
  }
  store_initial_grads<Cell>(p, d, n0, it, 0, dh, H, dc, H, b);
}

// ---------------------------------------------------------------------------
// Cluster path (sm_90): W_hh too large for one block's shared memory is
// split by units between the `size` blocks of a thread-block cluster.
// Member q owns units [q * Hc, ...) (owned_units); every member keeps a full
// copy of its rows' state (forward) or dz (backward), and writes each value
// it computes into every member's copy through distributed shared memory;
// one cluster barrier a step makes the next buffer complete everywhere.

template <typename Cell, typename T, class Block>
FASTRNN_HD void forward_cluster_body(const ForwardParams<T>& p, const Geometry& g, int64_t grp,
                                     int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, Hc = share_units(H, b.size);
  const int64_t j0 = b.rank * Hc, nj = owned_units(H, b.size, b.rank);
  const auto l = SmemLayout<Cell, T>::forward(H, p.P, g.rows, Hc, 2);
  const int64_t n0 = grp * g.rows, R = rows_in_block(n0, g.rows, p.N);
  Wt* w = reinterpret_cast<Wt*>(smem + l.w);       // (G*Hc, Wst)
  A* state = reinterpret_cast<A*>(smem + l.state);  // (2, rows, Ss), the same offset in every member
  A* cs = reinterpret_cast<A*>(smem + l.cs);        // (rows, Hc)
  const Items it{R, nj, g.split};
  zero_fill(w, Cell::kGates * Hc * l.Wst, b);
  zero_fill(state, 2 * g.rows * l.Ss, b);
  b.sync();
  for (int gate = 0; gate < Cell::kGates; ++gate)
    load_matrix(p.w_hh[d], p.P, gate * H + j0, nj, 0, p.P, false, w + gate * Hc * l.Wst, l.Wst, b);
  load_initial_state<Cell>(p, d, n0, R, state, l.Ss, cs, Hc, j0, nj, b);
  UnitInputs<A, Cell> ahead;
  first_inputs<Cell>(p, d == 0 ? 0 : T_ - 1, d, n0, it, j0, ahead, b);
  b.cluster_sync();  // every member started and initialised before any peer writes
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const int64_t t_next = s + 1 < T_ ? (d == 0 ? s + 1 : T_ - 2 - s) : -1;
    const A* prev = state + (s & 1) * g.rows * l.Ss;
    const int64_t next = l.state + ((s + 1) & 1) * g.rows * l.Ss * static_cast<int64_t>(sizeof(A));
    forward_items<Cell>(p, t, d, n0, it, j0, Hc, w, l.Wst, prev, l.Ss, cs, Hc, ahead, t_next, b,
                        [&](int64_t r, int64_t j, A v) {
                          for (int64_t m = 0; m < b.size; ++m)
                            reinterpret_cast<A*>(b.peer(m) + next)[r * l.Ss + j] = v;
                        });
    b.cluster_sync();
  }
  store_final_state<Cell>(p, d, n0, R, state + (T_ & 1) * g.rows * l.Ss, l.Ss, cs, Hc, j0, nj, b);
}

template <typename Cell, typename T, class Block>
FASTRNN_HD void backward_cluster_body(const BackwardParams<T>& p, const Geometry& g, int64_t grp,
                                      int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, GH = Cell::kGates * H, Hc = share_units(H, b.size);
  const int64_t k0 = b.rank * Hc, nk = owned_units(H, b.size, b.rank);
  const auto l = SmemLayout<Cell, T>::backward(H, g.rows, Hc, 2);
  const int64_t n0 = grp * g.rows, R = rows_in_block(n0, g.rows, p.N);
  Wt* wt = reinterpret_cast<Wt*>(smem + l.wt);  // (Hc, Mst): wt[c][m] = W_hh[m][k0 + c]
  A* dh = reinterpret_cast<A*>(smem + l.dh);    // (rows, Hc)
  A* dc = reinterpret_cast<A*>(smem + l.dc);    // (rows, Hc)
  const Items it{R, nk, g.split};
  const auto time = [&](int64_t s) { return d == 0 ? T_ - 1 - s : s; };
  zero_fill(wt, Hc * l.Mst, b);
  zero_fill(reinterpret_cast<A*>(smem + l.z), 2 * g.rows * l.Ms, b);
  b.sync();
  load_matrix(p.w_hh[d], p.P, 0, GH, k0, nk, true, wt, l.Mst, b);
  load_final_grads<Cell>(p, d, n0, it, k0, dh, Hc, dc, Hc, b);
  GradInputs<A, Cell> ahead;
  load_grad_inputs<Cell>(p, time(0), d, n0, item_of(it, 0, b), k0, ahead);
  b.cluster_sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = time(s);
    const int64_t buf = l.z + (s & 1) * g.rows * l.Ms * static_cast<int64_t>(sizeof(A));
    dz_items<Cell>(p, t, d, n0, it, k0, dh, Hc, dc, Hc, ahead, s + 1 < T_ ? time(s + 1) : -1, b,
                   [&](int64_t r, int64_t m, A v) {
                     for (int64_t q = 0; q < b.size; ++q)
                       reinterpret_cast<A*>(b.peer(q) + buf)[r * l.Ms + m] = v;
                   });
    b.cluster_sync();
    carry_items(p.lengths, t, n0, it, reinterpret_cast<const A*>(smem + buf), l.Ms, wt, l.Mst,
                dh, Hc, b);
  }
  store_initial_grads<Cell>(p, d, n0, it, k0, dh, Hc, dc, Hc, b);
}

// ---------------------------------------------------------------------------
// Grid path: W_hh too large for one cluster's shared memory, or a device
// without clusters. W_hh is split by units between the `size` blocks of a
// group, placed anywhere on the device and all resident at once (a
// cooperative launch guarantees it; a block that waited for a
// multiprocessor held by its own group would never start). Each step the
// members publish their units of the new state (forward) or of dz
// (backward) in an exchange buffer in global memory, (2, D, N, S) in A with
// rows padded like shared memory's and double-buffered by the parity of the
// step, then meet at the group's flag barrier (group_barrier), which also
// orders the writes before it against the reads after it. Each member then
// copies the buffer's rows into its shared memory, 16 bytes at a time.
//
// Why one barrier a step is enough: a member rewrites a buffer two steps
// after it was filled, past a barrier that every member reaches only once it
// has copied that buffer into its shared memory.

// The flag barrier of step s: every member's thread 0 adds one to the
// group's counter with release order and waits, with acquire order, until
// all `size` have; the block barriers around it hold the block's other
// threads on either side. The device and the emulator run this same code,
// on cuda::atomic_ref and HostAtomicRef. A wait past b.timeout_ns (the
// group's blocks not all resident: another process or an NCCL kernel holding
// multiprocessors) raises the launch's abort flag instead of hanging; every
// block that sees the flag in a wait leaves the kernel, so the launch ends,
// and the host reads the flag and raises (no trap, so the CUDA context and
// the process survive). Returns whether the block goes on.
#if !defined(__CUDA_ARCH__)
// std::atomic_ref's interface for the emulator, on the __atomic builtins so
// that it builds as C++17 (torch before 2.13 compiles extensions as C++17).
// ThreadSanitizer instruments the builtins with the orderings given. The
// order is a type, so that it stays a constant at any optimisation level.
template <int Order>
using HostOrder = std::integral_constant<int, Order>;
struct HostAtomicRef {
  unsigned int* p;
  explicit HostAtomicRef(unsigned int& v) : p(&v) {}
  template <int Order>
  unsigned int fetch_add(unsigned int v, HostOrder<Order>) {
    return __atomic_fetch_add(p, v, Order);
  }
  template <int Order>
  unsigned int load(HostOrder<Order>) const {
    return __atomic_load_n(p, Order);
  }
};
#endif

FASTRNN_HD int64_t clock_ns() {
#if defined(__CUDA_ARCH__)
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<int64_t>(t);
#else
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
#endif
}

template <class Block>
FASTRNN_HD bool group_barrier(const Block& b, int64_t s) {
  b.sync();
  bool stop = false;
  if (b.tid == 0) {
    const unsigned int target = static_cast<unsigned int>((s + 1) * b.size);
#if defined(__CUDA_ARCH__)
    ::cuda::atomic_ref<unsigned int, ::cuda::thread_scope_device> counter(*b.counter);
    ::cuda::atomic_ref<unsigned int, ::cuda::thread_scope_device> abort(*b.abort);
    constexpr auto release = ::cuda::memory_order_release;
    constexpr auto acquire = ::cuda::memory_order_acquire;
#else
    HostAtomicRef counter(*b.counter);
    HostAtomicRef abort(*b.abort);
    constexpr HostOrder<__ATOMIC_RELEASE> release{};
    constexpr HostOrder<__ATOMIC_ACQUIRE> acquire{};
#endif
    counter.fetch_add(1u, release);
    const int64_t start = clock_ns();
    while (counter.load(acquire) < target) {
      b.spin();
      if (abort.load(acquire) != 0) {
        stop = true;
        break;
      }
      if (clock_ns() - start > b.timeout_ns) {
        abort.fetch_add(1u, release);
        stop = true;
        break;
      }
    }
  }
  return !b.sync_or(stop);
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

template <typename Cell, typename T, class Block>
FASTRNN_HD void forward_grid_body(const ForwardParams<T>& p, const Geometry& g, int64_t grp,
                                  int64_t d, typename AccOf<T>::type* exchange,
                                  unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, Hc = share_units(H, b.size);
  const int64_t j0 = b.rank * Hc, nj = owned_units(H, b.size, b.rank);
  const auto l = SmemLayout<Cell, T>::forward(H, p.P, g.rows, Hc, 1);
  const int64_t n0 = grp * g.rows, R = rows_in_block(n0, g.rows, p.N);
  const int64_t buffer = p.D * p.N * l.Ss, rows0 = (d * p.N + n0) * l.Ss;  // a buffer; our rows in one
  Wt* w = reinterpret_cast<Wt*>(smem + l.w);       // (G*Hc, Wst)
  A* state = reinterpret_cast<A*>(smem + l.state);  // (rows, Ss): h of the previous step
  A* cs = reinterpret_cast<A*>(smem + l.cs);        // (rows, Hc)
  const Items it{R, nj, g.split};
  zero_fill(w, Cell::kGates * Hc * l.Wst, b);
  b.sync();
  for (int gate = 0; gate < Cell::kGates; ++gate)
    load_matrix(p.w_hh[d], p.P, gate * H + j0, nj, 0, p.P, false, w + gate * Hc * l.Wst, l.Wst, b);
  load_initial_state<Cell>(p, d, n0, R, state, l.Ss, cs, Hc, j0, nj, b);
  UnitInputs<A, Cell> ahead;
  first_inputs<Cell>(p, d == 0 ? 0 : T_ - 1, d, n0, it, j0, ahead, b);
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const int64_t t_next = s + 1 < T_ ? (d == 0 ? s + 1 : T_ - 2 - s) : -1;
    if (s > 0) gather_rows(exchange + ((s + 1) & 1) * buffer + rows0, state, R, l.Ss, b);
    b.sync();
    A* next = exchange + (s & 1) * buffer + rows0;
    forward_items<Cell>(p, t, d, n0, it, j0, Hc, w, l.Wst, state, l.Ss, cs, Hc, ahead, t_next, b,
                        [&](int64_t r, int64_t j, A v) { next[r * l.Ss + j] = v; });
    if (!group_barrier(b, s)) return;
  }
  gather_rows(exchange + ((T_ - 1) & 1) * buffer + rows0, state, R, l.Ss, b);
  b.sync();
  store_final_state<Cell>(p, d, n0, R, state, l.Ss, cs, Hc, j0, nj, b);
}

template <typename Cell, typename T, class Block>
FASTRNN_HD void backward_grid_body(const BackwardParams<T>& p, const Geometry& g, int64_t grp,
                                   int64_t d, typename AccOf<T>::type* exchange,
                                   unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  const int64_t T_ = p.T, H = p.H, GH = Cell::kGates * H, Hc = share_units(H, b.size);
  const int64_t k0 = b.rank * Hc, nk = owned_units(H, b.size, b.rank);
  const auto l = SmemLayout<Cell, T>::backward(H, g.rows, Hc, 1);
  const int64_t n0 = grp * g.rows, R = rows_in_block(n0, g.rows, p.N);
  const int64_t buffer = p.D * p.N * l.Ms, rows0 = (d * p.N + n0) * l.Ms;
  Wt* wt = reinterpret_cast<Wt*>(smem + l.wt);  // (Hc, Mst)
  A* z = reinterpret_cast<A*>(smem + l.z);      // (rows, Ms): dgh of the step, every gate and unit
  A* dh = reinterpret_cast<A*>(smem + l.dh);    // (rows, Hc)
  A* dc = reinterpret_cast<A*>(smem + l.dc);    // (rows, Hc)
  const Items it{R, nk, g.split};
  const auto time = [&](int64_t s) { return d == 0 ? T_ - 1 - s : s; };
  zero_fill(wt, Hc * l.Mst, b);
  b.sync();
  load_matrix(p.w_hh[d], p.P, 0, GH, k0, nk, true, wt, l.Mst, b);
  load_final_grads<Cell>(p, d, n0, it, k0, dh, Hc, dc, Hc, b);
  GradInputs<A, Cell> ahead;
  load_grad_inputs<Cell>(p, time(0), d, n0, item_of(it, 0, b), k0, ahead);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = time(s);
    A* mine = exchange + (s & 1) * buffer + rows0;
    dz_items<Cell>(p, t, d, n0, it, k0, dh, Hc, dc, Hc, ahead, s + 1 < T_ ? time(s + 1) : -1, b,
                   [&](int64_t r, int64_t m, A v) { mine[r * l.Ms + m] = v; });
    if (!group_barrier(b, s)) return;
    gather_rows(mine, z, R, l.Ms, b);
    b.sync();
    carry_items(p.lengths, t, n0, it, z, l.Ms, wt, l.Mst, dh, Hc, b);
  }
  store_initial_grads<Cell>(p, d, n0, it, k0, dh, Hc, dc, Hc, b);
}

// The path bodies by the params they take: the forward's or the backward's.
template <typename Cell, typename T, class Block>
FASTRNN_HD void persistent_body(const ForwardParams<T>& p, const Geometry& g, int64_t bx,
                                int64_t d, unsigned char* smem, const Block& b) {
  forward_persistent_body<Cell>(p, g, bx, d, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void persistent_body(const BackwardParams<T>& p, const Geometry& g, int64_t bx,
                                int64_t d, unsigned char* smem, const Block& b) {
  backward_persistent_body<Cell>(p, g, bx, d, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void cluster_body(const ForwardParams<T>& p, const Geometry& g, int64_t grp,
                             int64_t d, unsigned char* smem, const Block& b) {
  forward_cluster_body<Cell>(p, g, grp, d, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void cluster_body(const BackwardParams<T>& p, const Geometry& g, int64_t grp,
                             int64_t d, unsigned char* smem, const Block& b) {
  backward_cluster_body<Cell>(p, g, grp, d, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void grid_body(const ForwardParams<T>& p, const Geometry& g, int64_t grp, int64_t d,
                          typename AccOf<T>::type* exchange, unsigned char* smem, const Block& b) {
  forward_grid_body<Cell>(p, g, grp, d, exchange, smem, b);
}
template <typename Cell, typename T, class Block>
FASTRNN_HD void grid_body(const BackwardParams<T>& p, const Geometry& g, int64_t grp, int64_t d,
                          typename AccOf<T>::type* exchange, unsigned char* smem, const Block& b) {
  backward_grid_body<Cell>(p, g, grp, d, exchange, smem, b);
}

// ---------------------------------------------------------------------------
// Step path: per step, the GEMMs through cuBLAS on the torch side and these
// elementwise bodies, one thread per (direction, row, unit). States and
// gradients carried between steps are (D, N, ...) arrays in A.

// Forward, element i = n * H + j of direction d at step s: hw (D, N, G*H) =
// h W_hh^T from cuBLAS; h (D, N, P) and c (D, N, H) the states, updated for
// active rows. Without projections the new h goes to y too; with them, to m
// (D, N, H), which project_step_body finishes.
template <typename Cell, typename T>
FASTRNN_HD void forward_step_body(const ForwardParams<T>& p, int64_t s,
                                  const typename AccOf<T>::type* hw,
                                  typename AccOf<T>::type* h, typename AccOf<T>::type* c,
                                  typename AccOf<T>::type* m, int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  constexpr int G = Cell::kGates;
  const int64_t N = p.N, H = p.H, P = p.P, GH = G * H;
  const DivMod nj = divmod(i, H);
  const int64_t n = nj.q, j = nj.r;
  const int64_t t = d == 0 ? s : p.T - 1 - s;
  const bool proj = m != nullptr;
  T* out = p.y + (t * N + n) * p.D * P + d * P + j;
  T* saved = saved_width<Cell>(H) ? p.saved + ((d * p.T + t) * N + n) * saved_width<Cell>(H) + j
                                  : nullptr;
  if (!row_active(p.lengths, n, t)) {
    if (!proj) *out = from_acc<T>(A(0));
    for (int k = 0; k < Cell::kSaved + (Cell::kCellState ? 1 : 0); ++k) saved[k * H] = from_acc<T>(A(0));
    if (proj) m[(d * N + n) * H + j] = A(0);
    return;
  }
  A u[G], hwq[G], bh[G], sv[Cell::kSaved > 0 ? Cell::kSaved : 1];
  const T* ut = p.u + ((d * p.T + t) * N + n) * GH + j;
  for (int g = 0; g < G; ++g) {
    u[g] = to_acc(ut[g * H]) + input_bias<Cell>(p, d, g * H + j);
    hwq[g] = hw[(d * N + n) * GH + g * H + j];
    bh[g] = hidden_bias<Cell>(p, d, g * H + j);
  }
  A cv = Cell::kCellState ? c[(d * N + n) * H + j] : A(0);
  A v;
  // h_prev of the unit: without projections P == H, so the state has one per unit.
  Cell::template forward<ScalarMath<A>, A>(u, hwq, bh, proj ? A(0) : h[(d * N + n) * P + j], cv,
                                           v, sv);
  for (int k = 0; k < Cell::kSaved; ++k) saved[k * H] = from_acc<T>(sv[k]);
  if constexpr (Cell::kCellState) {
    c[(d * N + n) * H + j] = cv;
    saved[Cell::kSaved * H] = from_acc<T>(cv);
  }
  if (proj) {
    m[(d * N + n) * H + j] = v;
  } else {
    h[(d * N + n) * P + j] = v;
    *out = from_acc<T>(v);
  }
}

// With projections, element i = n * P + k: hp (D, N, P) = m W_hr^T from
// cuBLAS becomes the state and the output of active rows.
template <typename T>
FASTRNN_HD void project_step_body(const ForwardParams<T>& p, int64_t s,
                                  const typename AccOf<T>::type* hp, typename AccOf<T>::type* h,
                                  int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  const DivMod nk = divmod(i, p.P);
  const int64_t t = d == 0 ? s : p.T - 1 - s;
  T* out = p.y + (t * p.N + nk.q) * p.D * p.P + d * p.P + nk.r;
  if (!row_active(p.lengths, nk.q, t)) {
    *out = from_acc<T>(A(0));
    return;
  }
  const A v = hp[(d * p.N) * p.P + i];
  h[(d * p.N) * p.P + i] = v;
  *out = from_acc<T>(v);
}

// Backward with projections, first: element i = n * P + k of dL/dh' = dy +
// dh for active rows (zero for the others) into gp (D, N, P) and p.dhr;
// cuBLAS then makes gm = gp W_hr.
template <typename T>
FASTRNN_HD void unproject_step_body(const BackwardParams<T>& p, int64_t s,
                                    const typename AccOf<T>::type* dh,
                                    typename AccOf<T>::type* gp, int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  const DivMod nk = divmod(i, p.P);
  const int64_t t = d == 0 ? p.T - 1 - s : s;
  A g = A(0);
  if (row_active(p.lengths, nk.q, t))
    g = to_acc(p.dy[(t * p.N + nk.q) * p.D * p.P + d * p.P + nk.r]) + dh[d * p.N * p.P + i];
  gp[d * p.N * p.P + i] = g;
  p.dhr[((d * p.T + t) * p.N) * p.P + i] = from_acc<T>(g);
}

// Backward, element i = n * H + j: the cell's backward step from dL/dh' (dy
// + dh, or gm (D, N, H) with projections); dgh into p.dgh and z (D, N, G*H),
// dgi into p.dgi; dc (D, N, H) updated and the part of dL/dh_prev outside
// W_hh into dhd (D, N, P) for active rows; zeros for the others.
template <typename Cell, typename T>
FASTRNN_HD void backward_step_body(const BackwardParams<T>& p, int64_t s,
                                   const typename AccOf<T>::type* dh,
                                   const typename AccOf<T>::type* gm,
                                   typename AccOf<T>::type* z, typename AccOf<T>::type* dc,
                                   typename AccOf<T>::type* dhd, int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  constexpr int G = Cell::kGates;
  const int64_t N = p.N, H = p.H, P = p.P, GH = G * H, DP = p.D * P, Ws = saved_width<Cell>(H);
  const DivMod nj = divmod(i, H);
  const int64_t n = nj.q, j = nj.r;
  const int64_t t = d == 0 ? p.T - 1 - s : s;
  const int64_t o = ((d * p.T + t) * N + n) * GH + j;
  A* zr = z + (d * N + n) * GH + j;
  if (!row_active(p.lengths, n, t)) {
    for (int g = 0; g < G; ++g) {
      zr[g * H] = A(0);
      p.dgh[o + g * H] = from_acc<T>(A(0));
      if (Cell::kHiddenBias) p.dgi[o + g * H] = from_acc<T>(A(0));
    }
    return;
  }
  const int64_t oy = (t * N + n) * DP + d * P + j;
  const A gh = gm != nullptr ? gm[(d * N + n) * H + j] : to_acc(p.dy[oy]) + dh[(d * N + n) * P + j];
  const A y = gm != nullptr ? A(0) : to_acc(p.y[oy]);
  const T* saved = Ws ? p.saved + ((d * p.T + t) * N + n) * Ws + j : nullptr;
  A sv[Cell::kSaved > 0 ? Cell::kSaved : 1];
  for (int k = 0; k < Cell::kSaved; ++k) sv[k] = to_acc(saved[k * H]);
  const int64_t prev = prev_step(p.lengths, n, t, d, p.T);
  A cv = A(0), cp = A(0), hp = A(0), dcv = A(0);
  if constexpr (Cell::kCellState) {
    cv = to_acc(saved[Cell::kSaved * H]);
    cp = prev >= 0 ? to_acc(p.saved[((d * p.T + prev) * N + n) * Ws + Cell::kSaved * H + j])
                   : to_acc(p.c0[(d * N + n) * H + j]);
    dcv = dc[(d * N + n) * H + j];
  }
  if constexpr (Cell::kPrevState)
    hp = prev >= 0 ? to_acc(p.y[(prev * N + n) * DP + d * P + j]) : to_acc(p.h0[(d * N + n) * P + j]);
  A dgh[G], dgi[G], dhp = A(0);
  Cell::template backward<ScalarMath<A>, A>(gh, y, sv, hp, cp, cv, dcv, dgh, dgi, dhp);
  for (int g = 0; g < G; ++g) {
    zr[g * H] = dgh[g];
    p.dgh[o + g * H] = from_acc<T>(dgh[g]);
    if (Cell::kHiddenBias) p.dgi[o + g * H] = from_acc<T>(dgi[g]);
  }
  if constexpr (Cell::kCellState) dc[(d * N + n) * H + j] = dcv;
  if constexpr (Cell::kPrevState) dhd[(d * N + n) * P + j] = dhp;
}

// Last: element i = n * P + k, dh = dzw (+ dhd) for active rows, from dzw
// (D, N, P) = z W_hh from cuBLAS; inactive rows keep dh.
template <typename Cell, typename T>
FASTRNN_HD void carry_step_body(const BackwardParams<T>& p, int64_t s,
                                const typename AccOf<T>::type* dzw,
                                const typename AccOf<T>::type* dhd,
                                typename AccOf<T>::type* dh, int64_t d, int64_t i) {
  const int64_t t = d == 0 ? p.T - 1 - s : s;
  if (!row_active(p.lengths, i / p.P, t)) return;
  const int64_t o = d * p.N * p.P + i;
  dh[o] = Cell::kPrevState ? dzw[o] + dhd[o] : dzw[o];
}

}  // namespace cuda
}  // namespace fastrnn
