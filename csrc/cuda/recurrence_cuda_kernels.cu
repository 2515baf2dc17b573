// The CUDA time loops of one layer (see recurrence_cuda_kernels.h for the two paths).
// Arithmetic runs in the accumulation type (float, or double for double);
// the hidden state is carried in it too, so half and bfloat16 round only what
// they store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/recurrence_cuda_kernels.h"

namespace fastrnn {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ typename AccOf<T>::type to_acc(T v) {
  return static_cast<typename AccOf<T>::type>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float act(float z, bool relu) {
  // `z < 0 ? 0 : z` keeps NaN, as torch.relu does.
  return relu ? (z < 0.f ? 0.f : z) : tanhf(z);
}
__device__ __forceinline__ double act(double z, bool relu) {
  return relu ? (z < 0.0 ? 0.0 : z) : tanh(z);
}

// d act / dz from the activation's output h, times g: torch's
// threshold_backward (zero where h <= 0) and tanh_backward (g * (1 - h*h)).
template <typename A>
__device__ __forceinline__ A act_backward(A g, A h, bool relu) {
  return relu ? (h <= A(0) ? A(0) : g) : g * (A(1) - h * h);
}

__device__ __forceinline__ bool active(const int64_t* lengths, int64_t n, int64_t t) {
  return lengths == nullptr || t < lengths[n];
}

// grid (ceil(N / rows), D); shared memory: w_t (H, H) | state (2, rows, H).
template <typename T>
__global__ void __launch_bounds__(1024) forward_persistent_kernel(const ForwardParams<T> p, const int64_t rows) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t d = blockIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * rows;
  const int64_t R = rows < N - n0 ? rows : N - n0;
  A* w = reinterpret_cast<A*>(smem);  // (H, H): w[k * H + j] = W_hh[j][k]
  A* state = w + H * H;               // (2, rows, H)
  for (int64_t i = threadIdx.x; i < H * H; i += blockDim.x) w[i] = to_acc(p.w_hh_t[d * H * H + i]);
  for (int64_t i = threadIdx.x; i < R * H; i += blockDim.x)
    state[i] = to_acc(p.h0[(d * N + n0) * H + i]);
  __syncthreads();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? s : T_ - 1 - s;
    const A* prev = state + (s & 1) * rows * H;
    A* next = state + ((s + 1) & 1) * rows * H;
    for (int64_t i = threadIdx.x; i < R * H; i += blockDim.x) {
      const int64_t r = i / H, j = i - r * H, n = n0 + r;
      T* out = p.y + (t * N + n) * DH + d * H + j;
      if (!active(p.lengths, n, t)) {
        next[i] = prev[i];
        *out = from_acc<T>(A(0));
        continue;
      }
      A z = to_acc(p.u[((d * T_ + t) * N + n) * H + j]);
      const A* h = prev + r * H;
#pragma unroll 4
      for (int64_t k = 0; k < H; ++k) z += h[k] * w[k * H + j];
      z = act(z, p.relu);
      next[i] = z;
      *out = from_acc<T>(z);
    }
    __syncthreads();
  }
  const A* last = state + (T_ & 1) * rows * H;
  for (int64_t i = threadIdx.x; i < R * H; i += blockDim.x)
    p.hn[(d * N + n0) * H + i] = from_acc<T>(last[i]);
}

// grid (ceil(N / rows), D); shared memory: w (H, H) | dh (2, rows, H) | dz (rows, H).
template <typename T>
__global__ void __launch_bounds__(1024) backward_persistent_kernel(const BackwardParams<T> p, const int64_t rows) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t d = blockIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * rows;
  const int64_t R = rows < N - n0 ? rows : N - n0;
  A* w = reinterpret_cast<A*>(smem);  // (H, H): w[j * H + k] = W_hh[j][k]
  A* dh = w + H * H;                  // (2, rows, H)
  A* dz = dh + 2 * rows * H;          // (rows, H)
  for (int64_t i = threadIdx.x; i < H * H; i += blockDim.x) w[i] = to_acc(p.w_hh[d * H * H + i]);
  for (int64_t i = threadIdx.x; i < R * H; i += blockDim.x)
    dh[i] = p.dhn != nullptr ? to_acc(p.dhn[(d * N + n0) * H + i]) : A(0);
  __syncthreads();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = d == 0 ? T_ - 1 - s : s;
    const A* cur = dh + (s & 1) * rows * H;
    A* next = dh + ((s + 1) & 1) * rows * H;
    for (int64_t i = threadIdx.x; i < R * H; i += blockDim.x) {
      const int64_t r = i / H, j = i - r * H, n = n0 + r;
      A g = A(0);
      if (active(p.lengths, n, t)) {
        const int64_t o = (t * N + n) * DH + d * H + j;
        g = act_backward(to_acc(p.dy[o]) + cur[i], to_acc(p.y[o]), p.relu);
      }
      dz[i] = g;
      p.dz[((d * T_ + t) * N + n) * H + j] = from_acc<T>(g);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < R * H; i += blockDim.x) {
      const int64_t r = i / H, k = i - r * H;
      if (!active(p.lengths, n0 + r, t)) {
        next[i] = cur[i];
        continue;
      }
      const A* z = dz + r * H;
      A acc = A(0);
#pragma unroll 4
      for (int64_t j = 0; j < H; ++j) acc += z[j] * w[j * H + k];
      next[i] = acc;
    }
    __syncthreads();
  }
  const A* last = dh + (T_ & 1) * rows * H;
  for (int64_t i = threadIdx.x; i < R * H; i += blockDim.x)
    p.dh0[(d * N + n0) * H + i] = from_acc<T>(last[i]);
}

// grid (ceil(N * H / 256), D).
template <typename T>
__global__ void forward_step_kernel(const ForwardParams<T> p, const int64_t s,
                                    const typename AccOf<T>::type* hw,
                                    typename AccOf<T>::type* state) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t d = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // n * H + j
  if (i >= N * H) return;
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

template <typename T>
__global__ void backward_step_kernel(const BackwardParams<T> p, const int64_t s,
                                     const typename AccOf<T>::type* dh,
                                     typename AccOf<T>::type* dz_acc) {
  using A = typename AccOf<T>::type;
  const int64_t T_ = p.T, N = p.N, H = p.H, DH = p.D * p.H;
  const int64_t d = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * H) return;
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

template <typename T>
__global__ void backward_step_carry_kernel(const BackwardParams<T> p, const int64_t s,
                                           const typename AccOf<T>::type* dzw,
                                           typename AccOf<T>::type* dh) {
  const int64_t T_ = p.T, N = p.N, H = p.H;
  const int64_t d = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * H) return;
  const int64_t t = d == 0 ? T_ - 1 - s : s;
  if (active(p.lengths, i / H, t)) dh[d * N * H + i] = dzw[d * N * H + i];
}

constexpr int kStepThreads = 256;

int threads_for(int64_t work) {
  const int64_t warps = (work + 31) / 32;
  return static_cast<int>(warps >= 32 ? 1024 : (warps < 2 ? 64 : warps * 32));
}

// One launch of a persistent kernel: grid (ceil(N / rows), D), its shared
// memory raised past the 48 KB default where needed.
template <typename T, typename Params>
cudaError_t launch_persistent(void (*kernel)(const Params, const int64_t), const Params& p,
                              int64_t rows, cudaStream_t stream) {
  const size_t smem = persistent_smem_bytes(p.H, rows, sizeof(typename AccOf<T>::type) == 8);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.N + rows - 1) / rows), static_cast<unsigned>(p.D));
  kernel<<<grid, threads_for(rows * p.H), smem, stream>>>(p, rows);
  return cudaGetLastError();
}

dim3 step_grid(int64_t N, int64_t H, int64_t D) {
  return dim3(static_cast<unsigned>((N * H + kStepThreads - 1) / kStepThreads),
              static_cast<unsigned>(D));
}

}  // namespace

int64_t persistent_smem_bytes(int64_t H, int64_t rows, bool is_double) {
  // Forward: w + 2 state rows; backward: w + 2 dh rows + 1 dz row. The larger.
  return (H * H + 3 * rows * H) * (is_double ? 8 : 4);
}

#define FASTRNN_DEFINE_CUDA_LAUNCHERS(T)                                                        \
  cudaError_t launch_forward_persistent(const ForwardParams<T>& p, int64_t rows,               \
                                        cudaStream_t stream) {                                 \
    return launch_persistent<T>(forward_persistent_kernel<T>, p, rows, stream);                                                \
  }                                                                                            \
  cudaError_t launch_backward_persistent(const BackwardParams<T>& p, int64_t rows,             \
                                         cudaStream_t stream) {                                \
    return launch_persistent<T>(backward_persistent_kernel<T>, p, rows, stream);                                               \
  }                                                                                            \
  cudaError_t launch_forward_step(const ForwardParams<T>& p, int64_t s,                        \
                                  const AccOf<T>::type* hw, AccOf<T>::type* state,             \
                                  cudaStream_t stream) {                                       \
    forward_step_kernel<T><<<step_grid(p.N, p.H, p.D), kStepThreads, 0, stream>>>(p, s, hw,    \
                                                                                  state);      \
    return cudaGetLastError();                                                                 \
  }                                                                                            \
  cudaError_t launch_backward_step(const BackwardParams<T>& p, int64_t s,                      \
                                   const AccOf<T>::type* dh, AccOf<T>::type* dz_acc,           \
                                   cudaStream_t stream) {                                      \
    backward_step_kernel<T><<<step_grid(p.N, p.H, p.D), kStepThreads, 0, stream>>>(p, s, dh,   \
                                                                                   dz_acc);    \
    return cudaGetLastError();                                                                 \
  }                                                                                            \
  cudaError_t launch_backward_step_carry(const BackwardParams<T>& p, int64_t s,                \
                                         const AccOf<T>::type* dzw, AccOf<T>::type* dh,        \
                                         cudaStream_t stream) {                                \
    backward_step_carry_kernel<T>                                                              \
        <<<step_grid(p.N, p.H, p.D), kStepThreads, 0, stream>>>(p, s, dzw, dh);                \
    return cudaGetLastError();                                                                 \
  }

FASTRNN_DEFINE_CUDA_LAUNCHERS(float)
FASTRNN_DEFINE_CUDA_LAUNCHERS(double)
FASTRNN_DEFINE_CUDA_LAUNCHERS(__half)
FASTRNN_DEFINE_CUDA_LAUNCHERS(__nv_bfloat16)

}  // namespace cuda
}  // namespace fastrnn
