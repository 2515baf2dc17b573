// The CUDA time loop's types and scalar math, for the kernels, the emulator
// and the path chooser: the accumulation type A of each storage type T
// (float, or double for double), the type W_hh is kept in shared memory,
// conversions between them, and the cells' math on one unit (cells.h).
//
// Arithmetic runs in A; the states are carried in it too, so half and
// bfloat16 round only what they store. W_hh sits in shared memory in the
// storage type for half and bfloat16 (twice the hidden size per block), in A
// otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cells.h"

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
  // As written; the compiler fuses it where it may.
  static FASTRNN_HD A mul_add(A a, A b, A c) { return a * b + c; }
};

}  // namespace cuda
}  // namespace fastrnn
