// The bodies of the CUDA time-loop kernels, written once for two callers:
// the __global__ kernels in recurrence_cuda_kernels.cu, and the emulator in
// recurrence_cuda_emulate.cpp, which runs the same code on CPU threads (one
// per CUDA thread, a barrier for __syncthreads) so that the tests check the
// kernels' indexing, shared-memory layout and synchronisation on machines
// without a GPU.
//
// A body sees its block through `b`: b.tid and b.threads (threadIdx.x and
// blockDim.x), b.sync() (__syncthreads). Arithmetic runs in the accumulation
// type (float, or double for double); the hidden state is carried in it too,
// so half and bfloat16 round only what they store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "recurrence_params.h"

#if defined(__CUDACC__)
#define FASTRNN_HD __host__ __device__ __forceinline__
#else
#define FASTRNN_HD inline
#endif
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

FASTRNN_HD float act(float z, bool relu) {
  // `z < 0 ? 0 : z` keeps NaN, as torch.relu does.
  return relu ? (z < 0.f ? 0.f : z) : tanhf(z);
}
FASTRNN_HD double act(double z, bool relu) { return relu ? (z < 0.0 ? 0.0 : z) : tanh(z); }

// d act / dz from the activation's output h, times g: torch's
// threshold_backward (zero where h <= 0) and tanh_backward (g * (1 - h*h)).
template <typename A>
FASTRNN_HD A act_backward(A g, A h, bool relu) {
  return relu ? (h <= A(0) ? A(0) : g) : g * (A(1) - h * h);
}

FASTRNN_HD bool active(const int64_t* lengths, int64_t n, int64_t t) {
  return lengths == nullptr || t < lengths[n];
}

// Shared-memory layout. A thread computes one output as the dot product of a
// state row with one column of W_hh, both read 16 bytes at a time: state
// rows are padded to whole 16-byte units (row_stride), and the weight
// columns to an odd number of them (column_stride), so that the eight
// threads of a warp that share a 128-byte access phase land on distinct
// banks.
template <typename A>
FASTRNN_HD constexpr int64_t lanes() {
  return 16 / static_cast<int64_t>(sizeof(A));
}
FASTRNN_HD int64_t row_stride(int64_t H, int64_t L) { return (H + L - 1) / L * L; }
FASTRNN_HD int64_t column_stride(int64_t H, int64_t L) {
  const int64_t s = row_stride(H, L);
  return (s / L) % 2 == 1 ? s : s + L;
}

// Shared memory of the persistent kernels for `rows` batch rows per block.
// Forward: w (H, Hw) + state (2, rows, Hs); backward: w (H, Hw) + dh (rows,
// Hs) + dz (2, rows, Hs). The larger of the two.
inline int64_t persistent_smem_bytes(int64_t H, int64_t rows, bool is_double) {
  const int64_t L = is_double ? 2 : 4;
  return (H * column_stride(H, L) + 3 * rows * row_stride(H, L)) * (is_double ? 8 : 4);
}

// 16 bytes from p, 16-byte aligned: a vector load on the device; on the host
// (the emulator) the same values, after checking the alignment the device
// would need.
template <typename A>
FASTRNN_HD void load16(const A* p, A (&out)[lanes<A>()]);

template <>
FASTRNN_HD void load16<float>(const float* p, float (&out)[4]) {
#if defined(__CUDA_ARCH__)
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
#else
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    fprintf(stderr, "fastrnn: misaligned 16-byte shared-memory load at %p\n", (const void*)p);
    abort();
  }
  for (int l = 0; l < 4; ++l) out[l] = p[l];
#endif
}

template <>
FASTRNN_HD void load16<double>(const double* p, double (&out)[2]) {
#if defined(__CUDA_ARCH__)
  const double2 v = *reinterpret_cast<const double2*>(p);
  out[0] = v.x, out[1] = v.y;
#else
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    fprintf(stderr, "fastrnn: misaligned 16-byte shared-memory load at %p\n", (const void*)p);
    abort();
  }
  out[0] = p[0], out[1] = p[1];
#endif
}

// out[r] = x[r * xs, r * xs + n) . y[0, n) for r < NR, each 16-byte load of
// y shared by the NR rows (the rows' loads are broadcasts: every lane of a
// warp reads the same state row, and a different column of W_hh as y). One
// partial sum per lane of a 16-byte access, added up at the end, then the
// elements past the last whole access.
template <int NR, typename A>
FASTRNN_HD void dot_tile(const A* x, int64_t xs, const A* y, int64_t n, A* out) {
  constexpr int64_t L = lanes<A>();
  A acc[NR][L];
  for (int r = 0; r < NR; ++r)
    for (int64_t l = 0; l < L; ++l) acc[r][l] = A(0);
  int64_t k = 0;
  for (; k + L <= n; k += L) {
    A b[L];
    load16(y + k, b);
    for (int r = 0; r < NR; ++r) {
      A a[L];
      load16(x + r * xs + k, a);
      for (int64_t l = 0; l < L; ++l) acc[r][l] += a[l] * b[l];
    }
  }
  for (int r = 0; r < NR; ++r) {
    A sum = acc[r][0];
    for (int64_t l = 1; l < L; ++l) sum += acc[r][l];
    for (int64_t kk = k; kk < n; ++kk) sum += x[r * xs + kk] * y[kk];
    out[r] = sum;
  }
}

// A thread computes the outputs of one column for a tile of up to kRowTile
// batch rows: each weight load then serves kRowTile multiply-adds a lane
// instead of one, which is what bounds a step once a block holds several
// rows (shared memory delivers 128 bytes a cycle).
constexpr int kRowTile = 4;

// The tiles of a block of R rows, and the rows of the tile that starts at row r0.
FASTRNN_HD int64_t row_tiles(int64_t R) { return (R + kRowTile - 1) / kRowTile; }
FASTRNN_HD int64_t tile_rows(int64_t r0, int64_t R) { return R - r0 < kRowTile ? R - r0 : kRowTile; }

// dot_tile for the nr (1 to kRowTile) rows of a tile; out[r] for r >= nr is
// left alone.
template <typename A>
FASTRNN_HD void dot_rows(const A* x, int64_t xs, int64_t nr, const A* y, int64_t n,
                         A (&out)[kRowTile]) {
  static_assert(kRowTile == 4, "dot_rows dispatches tiles of 1 to 4 rows");
  switch (nr) {
    case 1: dot_tile<1>(x, xs, y, n, out); break;
    case 2: dot_tile<2>(x, xs, y, n, out); break;
    case 3: dot_tile<3>(x, xs, y, n, out); break;
    default: dot_tile<4>(x, xs, y, n, out); break;
  }
}

// Threads of a block of the persistent, cluster and grid kernels, at most.
// 512 leaves a thread 128 registers (the kernels declare one block per
// multiprocessor, which their shared memory allows anyway): ptxas -v for
// sm_90 shows no spills in the float32 kernels, 12 bytes in the half and
// bfloat16 cluster backward and 8-44 bytes in the float64 ones, where 1024
// threads (64 registers) spilled 36-116 bytes in every one.
// Where a block has more tiles than threads, a thread takes several.
constexpr int kMaxThreads = 512;

// Threads of a block that owns `rows` rows and H columns: one per tile of
// rows and column where that fits, whole warps, at least two of them.
inline int persistent_threads(int64_t rows, int64_t H) {
  const int64_t warps = (row_tiles(rows) * H + 31) / 32;
  return static_cast<int>(warps >= kMaxThreads / 32 ? kMaxThreads : (warps < 2 ? 64 : warps * 32));
}

constexpr int kStepThreads = 256;

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

// The forward step of one tile of rows [r0, r0 + nr) and one column j,
// rows relative to the block's first row n0: h = act(u + state . W_hh[j])
// for the rows active at step t, the carried state for the others (whose
// output is zero). Writes y and hands each row's new state to
// publish(r, v). state (rows, Hs) holds h of the previous step, every
// column; wj is the column W_hh[j] (H values).
template <typename T, typename Publish>
FASTRNN_HD void forward_tile(const ForwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                             int64_t r0, int64_t nr, int64_t j,
                             const typename AccOf<T>::type* state, int64_t Hs,
                             const typename AccOf<T>::type* wj, const Publish& publish) {
  using A = typename AccOf<T>::type;
  const int64_t N = p.N, H = p.H;
  // The input terms are loaded before the dot products, so that their trip
  // to global memory overlaps the arithmetic instead of following it.
  A u[kRowTile];
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q)
    u[q] = q < nr ? to_acc(p.u[((d * p.T + t) * N + n0 + r0 + q) * H + j]) : A(0);
  A hw[kRowTile];
  dot_rows(state + r0 * Hs, Hs, nr, wj, H, hw);
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q) {
    if (q >= nr) continue;
    const int64_t r = r0 + q, n = n0 + r;
    T* out = p.y + (t * N + n) * p.D * H + d * H + j;
    A v;
    if (active(p.lengths, n, t)) {
      v = act(u[q] + hw[q], p.relu);
      *out = from_acc<T>(v);
    } else {
      v = state[r * Hs + j];
      *out = from_acc<T>(A(0));
    }
    publish(r, v);
  }
}

// Block (bx, d) of the persistent forward: batch rows [bx * rows, ...) of
// direction d, all T steps, W_hh and the rows' state in shared memory.
template <typename T, typename Block>
FASTRNN_HD void forward_persistent_body(const ForwardParams<T>& p, int64_t rows, int64_t bx,
                                        int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H;
  const int64_t Hs = row_stride(H, lanes<A>()), Hw = column_stride(H, lanes<A>());
  const int64_t n0 = bx * rows, R = rows_in_block(n0, rows, N);
  A* w = reinterpret_cast<A*>(smem);  // (H, Hw): w[j * Hw + k] = W_hh[j][k]
  A* state = w + H * Hw;              // (2, rows, Hs)
  for (int64_t i = b.tid; i < H * H; i += b.threads) {
    const int64_t k = i / H, j = i - k * H;  // w_hh_t[k][j] = W_hh[j][k], read in order
    w[j * Hw + k] = to_acc(p.w_hh_t[d * H * H + i]);
  }
  for (int64_t i = b.tid; i < R * H; i += b.threads) {
    const int64_t r = i / H, j = i - r * H;
    state[r * Hs + j] = to_acc(p.h0[(d * N + n0) * H + i]);
  }
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const A* prev = state + (s & 1) * rows * Hs;
    A* next = state + ((s + 1) & 1) * rows * Hs;
    for (int64_t i = b.tid; i < row_tiles(R) * H; i += b.threads) {
      const DivMod tc = divmod(i, H);
      const int64_t r0 = tc.q * kRowTile, j = tc.r;
      forward_tile(p, t, d, n0, r0, tile_rows(r0, R), j, prev, Hs, w + j * Hw,
                   [&](int64_t r, A v) { next[r * Hs + j] = v; });
    }
    b.sync();
  }
  const A* last = state + (T_ & 1) * rows * Hs;
  for (int64_t i = b.tid; i < R * H; i += b.threads) {
    const int64_t r = i / H, j = i - r * H;
    p.hn[(d * N + n0) * H + i] = from_acc<T>(last[r * Hs + j]);
  }
}

// The backward bodies deal the tiles of a block's rows [0, R) and of its
// member's columns [c0, c0 + nc) to threads in one order, i = tile * nc + c
// from tid on, in every loop that touches dh, so that each element of dh is
// read and written by one thread only and needs no barrier from one step to
// the next.

// fn(r, c) for every element of this thread's tiles.
template <typename Block, typename Fn>
FASTRNN_HD void for_tile_elements(int64_t R, int64_t nc, const Block& b, const Fn& fn) {
  for (int64_t i = b.tid; i < row_tiles(R) * nc; i += b.threads) {
    const DivMod tc = divmod(i, nc);
    const int64_t r0 = tc.q * kRowTile, nr = tile_rows(r0, R);
    for (int64_t r = r0; r < r0 + nr; ++r) fn(r, tc.r);
  }
}

// dy and y of one tile at one step, loaded ahead of their use.
template <typename A>
struct TileInputs {
  A dy[kRowTile], y[kRowTile];
};

template <typename T>
FASTRNN_HD void load_tile_inputs(const BackwardParams<T>& p, int64_t t, int64_t d, int64_t n0,
                                 int64_t r0, int64_t nr, int64_t k,
                                 TileInputs<typename AccOf<T>::type>& in) {
  using A = typename AccOf<T>::type;
  FASTRNN_UNROLL
  for (int q = 0; q < kRowTile; ++q) {
    const int64_t o = (t * p.N + n0 + r0 + q) * p.D * p.H + d * p.H + k;
    in.dy[q] = q < nr ? to_acc(p.dy[o]) : A(0);
    in.y[q] = q < nr ? to_acc(p.y[o]) : A(0);
  }
}

// The inputs of this thread's first tile at step t, loaded one step early:
// issued before the dot products of the carry, their trip to global memory
// overlaps that arithmetic instead of opening the next step.
template <typename T, typename Block>
FASTRNN_HD void load_ahead(const BackwardParams<T>& p, int64_t t, int64_t d, int64_t n0, int64_t R,
                           int64_t c0, int64_t nc, TileInputs<typename AccOf<T>::type>& ahead,
                           const Block& b) {
  if (b.tid >= row_tiles(R) * nc) return;
  const DivMod tc = divmod(b.tid, nc);
  const int64_t r0 = tc.q * kRowTile;
  load_tile_inputs(p, t, d, n0, r0, tile_rows(r0, R), c0 + tc.r, ahead);
}

// dz of step t for this thread's tiles: act'(dy + dh) for active rows, zero
// for the others, into p.dz and handed to publish(r, k, g). dh (R, dhs)
// holds the member's columns; the first tile's inputs come from `ahead`.
template <typename T, typename Block, typename Publish>
FASTRNN_HD void dz_tiles(const BackwardParams<T>& p, int64_t t, int64_t d, int64_t n0, int64_t R,
                         int64_t c0, int64_t nc, const typename AccOf<T>::type* dh, int64_t dhs,
                         const TileInputs<typename AccOf<T>::type>& ahead, const Publish& publish,
                         const Block& b) {
  using A = typename AccOf<T>::type;
  for (int64_t i = b.tid; i < row_tiles(R) * nc; i += b.threads) {
    const DivMod tc = divmod(i, nc);
    const int64_t r0 = tc.q * kRowTile, c = tc.r, k = c0 + c, nr = tile_rows(r0, R);
    TileInputs<A> in;
    if (i == b.tid) {
      in = ahead;
    } else {
      load_tile_inputs(p, t, d, n0, r0, nr, k, in);
    }
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= nr) continue;
      const int64_t r = r0 + q, n = n0 + r;
      const A g = active(p.lengths, n, t)
                      ? act_backward(in.dy[q] + dh[r * dhs + c], in.y[q], p.relu)
                      : A(0);
      p.dz[((d * p.T + t) * p.N + n) * p.H + k] = from_acc<T>(g);
      publish(r, k, g);
    }
  }
}

// The dh carry, dh (R, dhs) = dz W_hh for the member's nc columns: dh[r][c]
// = z[r] . w[c] for the rows active at step t; inactive rows keep dh. z (R,
// Hs) holds dz of every column, w (nc, Hw) the member's columns of W_hh
// (w[c][j] = W_hh[j][c0 + c]).
template <typename A, typename Block>
FASTRNN_HD void carry_tiles(const int64_t* lengths, int64_t t, int64_t n0, int64_t R, int64_t nc,
                            const A* z, int64_t Hs, const A* w, int64_t Hw, int64_t H, A* dh,
                            int64_t dhs, const Block& b) {
  for (int64_t i = b.tid; i < row_tiles(R) * nc; i += b.threads) {
    const DivMod tc = divmod(i, nc);
    const int64_t r0 = tc.q * kRowTile, c = tc.r, nr = tile_rows(r0, R);
    A dzw[kRowTile];
    dot_rows(z + r0 * Hs, Hs, nr, w + c * Hw, H, dzw);
    FASTRNN_UNROLL
    for (int q = 0; q < kRowTile; ++q) {
      if (q >= nr) continue;
      if (active(lengths, n0 + r0 + q, t)) dh[(r0 + q) * dhs + c] = dzw[q];
    }
  }
}

// Block (bx, d) of the persistent backward, all T steps in reverse order;
// one barrier a step, dz double-buffered by the parity of the step.
template <typename T, typename Block>
FASTRNN_HD void backward_persistent_body(const BackwardParams<T>& p, int64_t rows, int64_t bx,
                                         int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H;
  const int64_t Hs = row_stride(H, lanes<A>()), Hw = column_stride(H, lanes<A>());
  const int64_t n0 = bx * rows, R = rows_in_block(n0, rows, N);
  A* w = reinterpret_cast<A*>(smem);  // (H, Hw): w[k * Hw + j] = W_hh[j][k]
  A* dh = w + H * Hw;                 // (rows, Hs): gradient of the state after the step
  A* dz = dh + rows * Hs;             // (2, rows, Hs)
  const auto time = [&](int64_t s) { return d == 0 ? T_ - 1 - s : s; };
  for (int64_t i = b.tid; i < H * H; i += b.threads) {
    const int64_t j = i / H, k = i - j * H;
    w[k * Hw + j] = to_acc(p.w_hh[d * H * H + i]);
  }
  for_tile_elements(R, H, b, [&](int64_t r, int64_t k) {
    dh[r * Hs + k] = p.dhn != nullptr ? to_acc(p.dhn[(d * N + n0 + r) * H + k]) : A(0);
  });
  TileInputs<A> ahead;
  load_ahead(p, time(0), d, n0, R, 0, H, ahead, b);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = time(s);
    A* z = dz + (s & 1) * rows * Hs;
    dz_tiles(p, t, d, n0, R, 0, H, dh, Hs, ahead,
             [&](int64_t r, int64_t k, A g) { z[r * Hs + k] = g; }, b);
    b.sync();
    if (s + 1 < T_) load_ahead(p, time(s + 1), d, n0, R, 0, H, ahead, b);
    carry_tiles(p.lengths, t, n0, R, H, z, Hs, w, Hw, H, dh, Hs, b);
  }
  for_tile_elements(R, H, b, [&](int64_t r, int64_t k) {
    p.dh0[(d * N + n0 + r) * H + k] = from_acc<T>(dh[r * Hs + k]);
  });
}

// The cluster path (sm_90): W_hh too large for one block's shared memory is
// split by output columns between the C blocks of a thread-block cluster.
// Member c owns columns [c * Hc, (c + 1) * Hc), Hc = ceil(H / C); every member
// keeps a full copy of its rows' state, and writes each value it computes
// into every member's copy through distributed shared memory; one cluster
// barrier a step makes the next state complete everywhere. Besides the
// block's own (tid, threads), the body uses b.rank and b.size (its place in
// the cluster), b.peer(q) (member q's shared memory) and b.cluster_sync().

FASTRNN_HD int64_t cluster_columns(int64_t H, int64_t C) { return (H + C - 1) / C; }

// Member q of C owns columns [q * Hc, q * Hc + owned_columns(H, C, q)): Hc of
// them, fewer or none at the end.
FASTRNN_HD int64_t owned_columns(int64_t H, int64_t C, int64_t q) {
  const int64_t Hc = cluster_columns(H, C), c0 = q * Hc;
  return c0 >= H ? 0 : (c0 + Hc <= H ? Hc : H - c0);
}

// Shared memory of one cluster member: forward w (Hc, Hw) + state (2, rows,
// Hs); backward w (Hc, Hw) + dz (2, rows, Hs) + dh (rows, Hc). The larger.
inline int64_t cluster_smem_bytes(int64_t H, int64_t C, int64_t rows, bool is_double) {
  const int64_t L = is_double ? 2 : 4, Hc = cluster_columns(H, C);
  return (Hc * column_stride(H, L) + rows * Hc + 2 * rows * row_stride(H, L)) * (is_double ? 8 : 4);
}

// Cluster member b.rank of row group g, direction d: the forward.
template <typename T, typename Block>
FASTRNN_HD void forward_cluster_body(const ForwardParams<T>& p, int64_t rows, int64_t g,
                                     int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H;
  const int64_t Hs = row_stride(H, lanes<A>()), Hw = column_stride(H, lanes<A>());
  const int64_t Hc = cluster_columns(H, b.size), j0 = b.rank * Hc, nj = owned_columns(H, b.size, b.rank);
  const int64_t n0 = g * rows, R = rows_in_block(n0, rows, N);
  A* w = reinterpret_cast<A*>(smem);  // (Hc, Hw): w[c * Hw + k] = W_hh[j0 + c][k]
  A* state = w + Hc * Hw;             // (2, rows, Hs), the same offset in every member
  for (int64_t i = b.tid; i < H * nj; i += b.threads) {
    const int64_t k = i / nj, c = i - k * nj;
    w[c * Hw + k] = to_acc(p.w_hh_t[(d * H + k) * H + j0 + c]);
  }
  for (int64_t i = b.tid; i < R * H; i += b.threads) {
    const int64_t r = i / H, j = i - r * H;
    state[r * Hs + j] = to_acc(p.h0[(d * N + n0) * H + i]);
  }
  b.cluster_sync();  // every member started and initialised before any peer writes
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const A* prev = state + (s & 1) * rows * Hs;
    const int64_t next = Hc * Hw + ((s + 1) & 1) * rows * Hs;  // element offset in every member
    for (int64_t i = b.tid; i < row_tiles(R) * nj; i += b.threads) {
      const DivMod tc = divmod(i, nj);
      const int64_t r0 = tc.q * kRowTile, c = tc.r, j = j0 + c;
      forward_tile(p, t, d, n0, r0, tile_rows(r0, R), j, prev, Hs, w + c * Hw, [&](int64_t r, A v) {
        for (int64_t m = 0; m < b.size; ++m) reinterpret_cast<A*>(b.peer(m))[next + r * Hs + j] = v;
      });
    }
    b.cluster_sync();
  }
  const A* last = state + (T_ & 1) * rows * Hs;
  for (int64_t i = b.tid; i < R * nj; i += b.threads) {
    const int64_t r = i / nj, j = j0 + (i - r * nj);
    p.hn[(d * N + n0 + r) * H + j] = from_acc<T>(last[r * Hs + j]);
  }
}

// Cluster member b.rank of row group g, direction d: the backward. The member
// owns columns [k0, k0 + nk) of dh and of dz; dz is exchanged like the
// forward's state, double-buffered, so one cluster barrier a step suffices.
template <typename T, typename Block>
FASTRNN_HD void backward_cluster_body(const BackwardParams<T>& p, int64_t rows, int64_t g,
                                      int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H;
  const int64_t Hs = row_stride(H, lanes<A>()), Hw = column_stride(H, lanes<A>());
  const int64_t Hc = cluster_columns(H, b.size), k0 = b.rank * Hc, nk = owned_columns(H, b.size, b.rank);
  const int64_t n0 = g * rows, R = rows_in_block(n0, rows, N);
  A* w = reinterpret_cast<A*>(smem);  // (Hc, Hw): w[c * Hw + j] = W_hh[j][k0 + c]
  const int64_t dz_offset = Hc * Hw;  // dz (2, rows, Hs), the same offset in every member
  A* dh = w + dz_offset + 2 * rows * Hs;  // (rows, Hc), this member's columns only
  const auto time = [&](int64_t s) { return d == 0 ? T_ - 1 - s : s; };
  for (int64_t i = b.tid; i < H * nk; i += b.threads) {
    const int64_t j = i / nk, c = i - j * nk;
    w[c * Hw + j] = to_acc(p.w_hh[(d * H + j) * H + k0 + c]);
  }
  for_tile_elements(R, nk, b, [&](int64_t r, int64_t c) {
    dh[r * Hc + c] = p.dhn != nullptr ? to_acc(p.dhn[(d * N + n0 + r) * H + k0 + c]) : A(0);
  });
  TileInputs<A> ahead;
  load_ahead(p, time(0), d, n0, R, k0, nk, ahead, b);
  b.cluster_sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = time(s);
    const int64_t buf = dz_offset + (s & 1) * rows * Hs;
    dz_tiles(p, t, d, n0, R, k0, nk, dh, Hc, ahead, [&](int64_t r, int64_t k, A g_) {
      for (int64_t m = 0; m < b.size; ++m) reinterpret_cast<A*>(b.peer(m))[buf + r * Hs + k] = g_;
    }, b);
    b.cluster_sync();
    if (s + 1 < T_) load_ahead(p, time(s + 1), d, n0, R, k0, nk, ahead, b);
    const A* z = reinterpret_cast<const A*>(smem) + buf;  // (rows, Hs), complete
    carry_tiles(p.lengths, t, n0, R, nk, z, Hs, w, Hw, H, dh, Hc, b);
  }
  for_tile_elements(R, nk, b, [&](int64_t r, int64_t c) {
    p.dh0[(d * N + n0 + r) * H + k0 + c] = from_acc<T>(dh[r * Hc + c]);
  });
}

// The grid path: W_hh too large for one cluster's shared memory, or a device
// without clusters. W_hh is split by output columns between the G blocks of
// a group, placed anywhere on the device and all resident at once (a
// cooperative launch guarantees it; a block that waited for a multiprocessor
// held by its own group would never start). Member q owns columns [q * Hc,
// (q + 1) * Hc) as in a cluster. Each step the members publish their columns
// of the new state (forward) or of dz (backward) in an exchange buffer in
// global memory, (2, D, N, H) in the accumulation type and double-buffered by
// the parity of the step, then meet at the group's flag barrier,
// b.group_sync(s): every member adds one to the group's counter in global
// memory and waits until all G have, which also orders the writes before it
// against the reads after it. Reads of the buffer go through
// load_exchange, which bypasses the multiprocessor's L1 cache (not coherent
// between multiprocessors). Besides tid, threads and sync(), the body uses
// b.rank and b.size.
//
// Why one barrier a step is enough: a member rewrites a buffer two steps
// after it was filled, past a barrier that every member reaches only once it
// has copied that buffer into its shared memory.

template <typename A>
FASTRNN_HD A load_exchange(const A* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// Shared memory of one member of a grid group: forward w (Hc, Hw) + state
// (rows, Hs); backward w (Hc, Hw) + dz (rows, Hs) + dh (rows, Hc). The larger.
inline int64_t grid_smem_bytes(int64_t H, int64_t G, int64_t rows, bool is_double) {
  const int64_t L = is_double ? 2 : 4, Hc = cluster_columns(H, G);
  return (Hc * column_stride(H, L) + rows * (row_stride(H, L) + Hc)) * (is_double ? 8 : 4);
}

// Member b.rank of row group g, direction d: the forward. exchange is (2, D,
// N, H); step s writes buffer s & 1.
template <typename T, typename Block>
FASTRNN_HD void forward_grid_body(const ForwardParams<T>& p, int64_t rows, int64_t g, int64_t d,
                                  typename AccOf<T>::type* exchange, unsigned char* smem,
                                  const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H;
  const int64_t Hs = row_stride(H, lanes<A>()), Hw = column_stride(H, lanes<A>());
  const int64_t Hc = cluster_columns(H, b.size), j0 = b.rank * Hc, nj = owned_columns(H, b.size, b.rank);
  const int64_t n0 = g * rows, R = rows_in_block(n0, rows, N);
  const int64_t buffer = p.D * N * H, rows0 = (d * N + n0) * H;  // a buffer's size; our rows in one
  A* w = reinterpret_cast<A*>(smem);  // (Hc, Hw): w[c * Hw + k] = W_hh[j0 + c][k]
  A* state = w + Hc * Hw;             // (rows, Hs): h of the previous step, every column
  for (int64_t i = b.tid; i < H * nj; i += b.threads) {
    const int64_t k = i / nj, c = i - k * nj;
    w[c * Hw + k] = to_acc(p.w_hh_t[(d * H + k) * H + j0 + c]);
  }
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const A* prev = exchange + ((s + 1) & 1) * buffer + rows0;  // written by step s - 1
    for (int64_t i = b.tid; i < R * H; i += b.threads) {
      const DivMod rk = divmod(i, H);
      state[rk.q * Hs + rk.r] = s == 0 ? to_acc(p.h0[rows0 + i]) : load_exchange(prev + i);
    }
    b.sync();
    A* next = exchange + (s & 1) * buffer + rows0;
    for (int64_t i = b.tid; i < row_tiles(R) * nj; i += b.threads) {
      const DivMod tc = divmod(i, nj);
      const int64_t r0 = tc.q * kRowTile, c = tc.r, j = j0 + c;
      forward_tile(p, t, d, n0, r0, tile_rows(r0, R), j, state, Hs, w + c * Hw,
                   [&](int64_t r, A v) { next[r * H + j] = v; });
    }
    b.group_sync(s);
  }
  const A* last = exchange + ((T_ - 1) & 1) * buffer + rows0;
  for (int64_t i = b.tid; i < R * nj; i += b.threads) {
    const int64_t r = i / nj, j = j0 + (i - r * nj);
    p.hn[rows0 + r * H + j] = from_acc<T>(load_exchange(last + r * H + j));
  }
}

// Member b.rank of row group g, direction d: the backward. The member owns
// columns [k0, k0 + nk) of dh and of dz; dz goes through the exchange
// buffer as the forward's state does.
template <typename T, typename Block>
FASTRNN_HD void backward_grid_body(const BackwardParams<T>& p, int64_t rows, int64_t g, int64_t d,
                                   typename AccOf<T>::type* exchange, unsigned char* smem,
                                   const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H;
  const int64_t Hs = row_stride(H, lanes<A>()), Hw = column_stride(H, lanes<A>());
  const int64_t Hc = cluster_columns(H, b.size), k0 = b.rank * Hc, nk = owned_columns(H, b.size, b.rank);
  const int64_t n0 = g * rows, R = rows_in_block(n0, rows, N);
  const int64_t buffer = p.D * N * H, rows0 = (d * N + n0) * H;
  A* w = reinterpret_cast<A*>(smem);  // (Hc, Hw): w[c * Hw + j] = W_hh[j][k0 + c]
  A* z = w + Hc * Hw;                 // (rows, Hs): dz of the step, every column
  A* dh = z + rows * Hs;              // (rows, Hc): this member's columns only
  const auto time = [&](int64_t s) { return d == 0 ? T_ - 1 - s : s; };
  for (int64_t i = b.tid; i < H * nk; i += b.threads) {
    const int64_t j = i / nk, c = i - j * nk;
    w[c * Hw + j] = to_acc(p.w_hh[(d * H + j) * H + k0 + c]);
  }
  for_tile_elements(R, nk, b, [&](int64_t r, int64_t c) {
    dh[r * Hc + c] = p.dhn != nullptr ? to_acc(p.dhn[rows0 + r * H + k0 + c]) : A(0);
  });
  TileInputs<A> ahead;
  load_ahead(p, time(0), d, n0, R, k0, nk, ahead, b);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = time(s);
    A* mine = exchange + (s & 1) * buffer + rows0;
    dz_tiles(p, t, d, n0, R, k0, nk, dh, Hc, ahead,
             [&](int64_t r, int64_t k, A g_) { mine[r * H + k] = g_; }, b);
    b.group_sync(s);
    if (s + 1 < T_) load_ahead(p, time(s + 1), d, n0, R, k0, nk, ahead, b);
    for (int64_t i = b.tid; i < R * H; i += b.threads) {
      const DivMod rj = divmod(i, H);
      z[rj.q * Hs + rj.r] = load_exchange(mine + i);
    }
    b.sync();
    carry_tiles(p.lengths, t, n0, R, nk, z, Hs, w, Hw, H, dh, Hc, b);
  }
  for_tile_elements(R, nk, b, [&](int64_t r, int64_t c) {
    p.dh0[rows0 + r * H + k0 + c] = from_acc<T>(dh[r * Hc + c]);
  });
}

// Element i = n * H + j of direction d at step s of the step path, forward:
// hw (D, N, H) = state W_hh^T came from cuBLAS; state (D, N, H) is updated.
template <typename T>
FASTRNN_HD void forward_step_body(const ForwardParams<T>& p, int64_t s,
                                  const typename AccOf<T>::type* hw,
                                  typename AccOf<T>::type* state, int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t n = i / H, j = i - n * H;
  const int64_t t = d == 0 ? s : T_ - 1 - s;
  T* out = p.y + (t * N + n) * DH + d * H + j;
  if (!active(p.lengths, n, t)) {
    *out = from_acc<T>(A(0));
    return;
  }
  const A z = act(to_acc(p.u[((d * T_ + t) * N + n) * H + j]) + hw[d * N * H + i], p.relu);
  state[d * N * H + i] = z;
  *out = from_acc<T>(z);
}

// Backward, first half: dz of the step (into p.dz and dz_acc (D, N, H)) from
// dh (D, N, H), the gradient of the state after the step.
template <typename T>
FASTRNN_HD void backward_step_body(const BackwardParams<T>& p, int64_t s,
                                   const typename AccOf<T>::type* dh,
                                   typename AccOf<T>::type* dz_acc, int64_t d, int64_t i) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t n = i / H, j = i - n * H;
  const int64_t t = d == 0 ? T_ - 1 - s : s;
  A g = A(0);
  if (active(p.lengths, n, t)) {
    const int64_t o = (t * N + n) * DH + d * H + j;
    g = act_backward(to_acc(p.dy[o]) + dh[d * N * H + i], to_acc(p.y[o]), p.relu);
  }
  dz_acc[d * N * H + i] = g;
  p.dz[((d * T_ + t) * N + n) * H + j] = from_acc<T>(g);
}

// Second half: dh = dz W_hh (dzw, from cuBLAS) for active rows; inactive rows
// keep dh.
template <typename T>
FASTRNN_HD void backward_step_carry_body(const BackwardParams<T>& p, int64_t s,
                                         const typename AccOf<T>::type* dzw,
                                         typename AccOf<T>::type* dh, int64_t d, int64_t i) {
  const int64_t t = d == 0 ? p.T - 1 - s : s;
  if (active(p.lengths, i / p.H, t)) dh[d * p.N * p.H + i] = dzw[d * p.N * p.H + i];
}

}  // namespace cuda
}  // namespace fastrnn
