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

#include "recurrence_params.h"

#if defined(__CUDACC__)
#define FASTRNN_HD __host__ __device__ __forceinline__
#else
#define FASTRNN_HD inline
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

// Shared memory of the persistent kernels for `rows` batch rows per block.
// Forward: w_t (H, H) + state (2, rows, H); backward: w (H, H) + dh (2, rows,
// H) + dz (rows, H). The larger of the two.
inline int64_t persistent_smem_bytes(int64_t H, int64_t rows, bool is_double) {
  return (H * H + 3 * rows * H) * (is_double ? 8 : 4);
}

// Threads of a persistent block: one per output where that fits, whole warps,
// at least two of them.
inline int persistent_threads(int64_t rows, int64_t H) {
  const int64_t warps = (rows * H + 31) / 32;
  return static_cast<int>(warps >= 32 ? 1024 : (warps < 2 ? 64 : warps * 32));
}

constexpr int kStepThreads = 256;

// Block (bx, d) of the persistent forward: batch rows [bx * rows, ...) of
// direction d, all T steps, W_hh^T and the rows' state in shared memory.
template <typename T, typename Block>
FASTRNN_HD void forward_persistent_body(const ForwardParams<T>& p, int64_t rows, int64_t bx,
                                        int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t n0 = bx * rows;
  const int64_t R = rows < N - n0 ? rows : N - n0;
  A* w = reinterpret_cast<A*>(smem);  // (H, H): w[k * H + j] = W_hh[j][k]
  A* state = w + H * H;               // (2, rows, H)
  for (int64_t i = b.tid; i < H * H; i += b.threads) w[i] = to_acc(p.w_hh_t[d * H * H + i]);
  for (int64_t i = b.tid; i < R * H; i += b.threads) state[i] = to_acc(p.h0[(d * N + n0) * H + i]);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const A* prev = state + (s & 1) * rows * H;
    A* next = state + ((s + 1) & 1) * rows * H;
    for (int64_t i = b.tid; i < R * H; i += b.threads) {
      const int64_t r = i / H, j = i - r * H, n = n0 + r;
      T* out = p.y + (t * N + n) * DH + d * H + j;
      if (!active(p.lengths, n, t)) {
        next[i] = prev[i];
        *out = from_acc<T>(A(0));
        continue;
      }
      A z = to_acc(p.u[((d * T_ + t) * N + n) * H + j]);
      const A* h = prev + r * H;
#if defined(__CUDA_ARCH__)
#pragma unroll 4
#endif
      for (int64_t k = 0; k < H; ++k) z += h[k] * w[k * H + j];
      z = act(z, p.relu);
      next[i] = z;
      *out = from_acc<T>(z);
    }
    b.sync();
  }
  const A* last = state + (T_ & 1) * rows * H;
  for (int64_t i = b.tid; i < R * H; i += b.threads)
    p.hn[(d * N + n0) * H + i] = from_acc<T>(last[i]);
}

// Block (bx, d) of the persistent backward, all T steps in reverse order.
template <typename T, typename Block>
FASTRNN_HD void backward_persistent_body(const BackwardParams<T>& p, int64_t rows, int64_t bx,
                                         int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t n0 = bx * rows;
  const int64_t R = rows < N - n0 ? rows : N - n0;
  A* w = reinterpret_cast<A*>(smem);  // (H, H): w[j * H + k] = W_hh[j][k]
  A* dh = w + H * H;                  // (2, rows, H)
  A* dz = dh + 2 * rows * H;          // (rows, H)
  for (int64_t i = b.tid; i < H * H; i += b.threads) w[i] = to_acc(p.w_hh[d * H * H + i]);
  for (int64_t i = b.tid; i < R * H; i += b.threads)
    dh[i] = p.dhn != nullptr ? to_acc(p.dhn[(d * N + n0) * H + i]) : A(0);
  b.sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? T_ - 1 - s : s;
    const A* cur = dh + (s & 1) * rows * H;
    A* next = dh + ((s + 1) & 1) * rows * H;
    for (int64_t i = b.tid; i < R * H; i += b.threads) {
      const int64_t r = i / H, j = i - r * H, n = n0 + r;
      A g = A(0);
      if (active(p.lengths, n, t)) {
        const int64_t o = (t * N + n) * DH + d * H + j;
        g = act_backward(to_acc(p.dy[o]) + cur[i], to_acc(p.y[o]), p.relu);
      }
      dz[i] = g;
      p.dz[((d * T_ + t) * N + n) * H + j] = from_acc<T>(g);
    }
    b.sync();
    for (int64_t i = b.tid; i < R * H; i += b.threads) {
      const int64_t r = i / H, k = i - r * H;
      if (!active(p.lengths, n0 + r, t)) {
        next[i] = cur[i];
        continue;
      }
      const A* z = dz + r * H;
      A acc = A(0);
#if defined(__CUDA_ARCH__)
#pragma unroll 4
#endif
      for (int64_t j = 0; j < H; ++j) acc += z[j] * w[j * H + k];
      next[i] = acc;
    }
    b.sync();
  }
  const A* last = dh + (T_ & 1) * rows * H;
  for (int64_t i = b.tid; i < R * H; i += b.threads)
    p.dh0[(d * N + n0) * H + i] = from_acc<T>(last[i]);
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

// Shared memory of one cluster member: forward w (H, Hc) + state (2, rows, H);
// backward w (H, Hc) + dh (rows, Hc) + dz (2, rows, H). The larger.
inline int64_t cluster_smem_bytes(int64_t H, int64_t C, int64_t rows, bool is_double) {
  const int64_t Hc = cluster_columns(H, C);
  return (H * Hc + rows * Hc + 2 * rows * H) * (is_double ? 8 : 4);
}

// Cluster member b.rank of row group g, direction d: the forward.
template <typename T, typename Block>
FASTRNN_HD void forward_cluster_body(const ForwardParams<T>& p, int64_t rows, int64_t g,
                                     int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t Hc = cluster_columns(H, b.size), j0 = b.rank * Hc;
  const int64_t nj = j0 >= H ? 0 : (j0 + Hc <= H ? Hc : H - j0);  // columns this member owns
  const int64_t n0 = g * rows;
  const int64_t R = rows < N - n0 ? rows : N - n0;
  A* w = reinterpret_cast<A*>(smem);  // (H, Hc): w[k * Hc + c] = W_hh[j0 + c][k]
  A* state = w + H * Hc;              // (2, rows, H), the same offset in every member
  for (int64_t i = b.tid; i < H * Hc; i += b.threads) {
    const int64_t k = i / Hc, c = i - k * Hc;
    w[i] = c < nj ? to_acc(p.w_hh_t[(d * H + k) * H + j0 + c]) : A(0);
  }
  for (int64_t i = b.tid; i < R * H; i += b.threads) state[i] = to_acc(p.h0[(d * N + n0) * H + i]);
  b.cluster_sync();  // every member started and initialised before any peer writes
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const A* prev = state + (s & 1) * rows * H;
    const int64_t next = H * Hc + ((s + 1) & 1) * rows * H;  // element offset in every member
    for (int64_t i = b.tid; i < R * nj; i += b.threads) {
      const int64_t r = i / nj, j = j0 + (i - r * nj), n = n0 + r;
      T* out = p.y + (t * N + n) * DH + d * H + j;
      A v;
      if (active(p.lengths, n, t)) {
        A z = to_acc(p.u[((d * T_ + t) * N + n) * H + j]);
        const A* h = prev + r * H;
        const A* wc = w + (j - j0);
        for (int64_t k = 0; k < H; ++k) z += h[k] * wc[k * Hc];
        v = act(z, p.relu);
        *out = from_acc<T>(v);
      } else {
        v = prev[r * H + j];
        *out = from_acc<T>(A(0));
      }
      for (int64_t q = 0; q < b.size; ++q) reinterpret_cast<A*>(b.peer(q))[next + r * H + j] = v;
    }
    b.cluster_sync();
  }
  const A* last = state + (T_ & 1) * rows * H;
  for (int64_t i = b.tid; i < R * nj; i += b.threads) {
    const int64_t r = i / nj, j = j0 + (i - r * nj);
    p.hn[(d * N + n0 + r) * H + j] = from_acc<T>(last[r * H + j]);
  }
}

// Cluster member b.rank of row group g, direction d: the backward. The member
// owns columns [k0, k0 + nk) of dh and of dz; dz is exchanged like the
// forward's state, double-buffered, so one cluster barrier a step suffices.
template <typename T, typename Block>
FASTRNN_HD void backward_cluster_body(const BackwardParams<T>& p, int64_t rows, int64_t g,
                                      int64_t d, unsigned char* smem, const Block& b) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t Hc = cluster_columns(H, b.size), k0 = b.rank * Hc;
  const int64_t nk = k0 >= H ? 0 : (k0 + Hc <= H ? Hc : H - k0);
  const int64_t n0 = g * rows;
  const int64_t R = rows < N - n0 ? rows : N - n0;
  A* w = reinterpret_cast<A*>(smem);  // (H, Hc): w[j * Hc + c] = W_hh[j][k0 + c]
  A* dh = w + H * Hc;                 // (rows, Hc), this member's columns only
  A* dz = dh + rows * Hc;             // (2, rows, H), the same offset in every member
  const int64_t dz_offset = H * Hc + rows * Hc;
  for (int64_t i = b.tid; i < H * Hc; i += b.threads) {
    const int64_t j = i / Hc, c = i - j * Hc;
    w[i] = c < nk ? to_acc(p.w_hh[(d * H + j) * H + k0 + c]) : A(0);
  }
  for (int64_t i = b.tid; i < R * nk; i += b.threads) {
    const int64_t r = i / nk, c = i - r * nk;
    dh[r * Hc + c] = p.dhn != nullptr ? to_acc(p.dhn[(d * N + n0 + r) * H + k0 + c]) : A(0);
  }
  b.cluster_sync();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? T_ - 1 - s : s;
    const int64_t buf = dz_offset + (s & 1) * rows * H;
    // Each thread keeps the same (r, c) in both loops, so its dh element
    // needs no barrier between them.
    for (int64_t i = b.tid; i < R * nk; i += b.threads) {
      const int64_t r = i / nk, c = i - r * nk, k = k0 + c, n = n0 + r;
      A g_ = A(0);
      if (active(p.lengths, n, t)) {
        const int64_t o = (t * N + n) * DH + d * H + k;
        g_ = act_backward(to_acc(p.dy[o]) + dh[r * Hc + c], to_acc(p.y[o]), p.relu);
      }
      p.dz[((d * T_ + t) * N + n) * H + k] = from_acc<T>(g_);
      for (int64_t q = 0; q < b.size; ++q) reinterpret_cast<A*>(b.peer(q))[buf + r * H + k] = g_;
    }
    b.cluster_sync();
    const A* z_all = reinterpret_cast<const A*>(smem) + buf;
    for (int64_t i = b.tid; i < R * nk; i += b.threads) {
      const int64_t r = i / nk, c = i - r * nk;
      if (!active(p.lengths, n0 + r, t)) continue;
      const A* z = z_all + r * H;
      const A* wc = w + c;
      A acc = A(0);
      for (int64_t j = 0; j < H; ++j) acc += z[j] * wc[j * Hc];
      dh[r * Hc + c] = acc;
    }
  }
  for (int64_t i = b.tid; i < R * nk; i += b.threads) {
    const int64_t r = i / nk, c = i - r * nk;
    p.dh0[(d * N + n0 + r) * H + k0 + c] = from_acc<T>(dh[r * Hc + c]);
  }
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
