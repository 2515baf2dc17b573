// Entry points of the CPU time loops, one set per instruction set; the
// dispatch in recurrence_cpu.cpp picks one at run time.
#pragma once

#include <cstdint>

#include "recurrence_params.h"

#define FASTRNN_DECLARE_CPU_ISA(isa)                                                    \
  namespace fastrnn {                                                                   \
  namespace cpu {                                                                       \
  namespace isa {                                                                       \
  /* Columns of J padded to whole vectors of this instruction set. */                 \
  int64_t padded_width(int64_t J, bool is_double);                                      \
  /* Packs b (K x J) for the time loops: K * padded_width(J) elements. */               \
  void pack(const float* b, int64_t K, int64_t J, float* out);                          \
  void pack(const double* b, int64_t K, int64_t J, double* out);                        \
  /* Rows [n0, n1) of direction d, its weights packed; the scratch holds */            \
  /* 2 * (n1 - n0) * padded_width(H) elements. */                                      \
  void forward_rows(const ForwardParams<float>& p, int64_t d, int64_t n0, int64_t n1,   \
                    const float* w_packed, float* scratch);                             \
  void forward_rows(const ForwardParams<double>& p, int64_t d, int64_t n0, int64_t n1,  \
                    const double* w_packed, double* scratch);                           \
  void backward_rows(const BackwardParams<float>& p, int64_t d, int64_t n0, int64_t n1, \
                     const float* w_packed, float* scratch);                            \
  void backward_rows(const BackwardParams<double>& p, int64_t d, int64_t n0,            \
                     int64_t n1, const double* w_packed, double* scratch);              \
  }                                                                                     \
  }                                                                                     \
  }

FASTRNN_DECLARE_CPU_ISA(base)
FASTRNN_DECLARE_CPU_ISA(avx2)
FASTRNN_DECLARE_CPU_ISA(avx512)
