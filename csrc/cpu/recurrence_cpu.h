// Entry points of the CPU time loops, one set per instruction set, each a
// template over the dtype S (float, double) and the cell, instantiated in
// that instruction set's file; the dispatch in recurrence_cpu.cpp picks one
// set at run time.
#pragma once

#include <cstdint>

#include "cells.h"
#include "recurrence_params.h"

// Whether this build has the AVX-512 kernels: every x86-64 build but those
// built with FASTRNN_NO_AVX512 (setup.py's FASTRNN_CPU_ISAS=native on a
// processor without AVX-512: the sanitizer and compatibility builds, which
// would compile code their processor never runs).
#if defined(__x86_64__) && !defined(FASTRNN_NO_AVX512)
#define FASTRNN_WITH_AVX512 1
#else
#define FASTRNN_WITH_AVX512 0
#endif
// And the AVX2 kernels: every x86-64 build but those built with
// FASTRNN_NO_AVX2 (FASTRNN_CPU_ISAS=base: the ThreadSanitizer build, whose
// tests run the CUDA emulator alone).
#if defined(__x86_64__) && !defined(FASTRNN_NO_AVX2)
#define FASTRNN_WITH_AVX2 1
#else
#define FASTRNN_WITH_AVX2 0
#endif

#define FASTRNN_DECLARE_CPU_ISA(isa)                                                          \
  namespace fastrnn {                                                                         \
  namespace cpu {                                                                             \
  namespace isa {                                                                             \
  /* Columns of J padded to whole vectors of this instruction set. */                       \
  template <typename S>                                                                       \
  int64_t padded_width(int64_t J);                                                            \
  /* Packs b (K x blocks*J), b[k][c] = src[k * sk + (blk * bs + j) * sc] for column j of */   \
  /* block blk, for the time loops: each block of J columns padded to padded_width(J); */     \
  /* K * blocks * padded_width(J) elements, of which the panels that start in columns */     \
  /* [c0, c1) are written. */                                                                 \
  template <typename S>                                                                       \
  void pack(const S* src, int64_t sk, int64_t sc, int64_t K, int64_t J, int64_t blocks,      \
            int64_t bs, S* out, int64_t c0, int64_t c1);                                      \
  /* Scratch elements per row of a block, forward or backward. */                            \
  template <typename S, typename Cell>                                                        \
  int64_t scratch_per_row(int64_t H, int64_t P, bool proj);                                   \
  /* Rows [n0, n1) of direction d. wf: W_hh^T packed in G blocks of H; wi: W_ih^T */         \
  /* packed alike where p.x replaces p.u; wr: W_hr^T packed, or null without */              \
  /* projections; bu: the bias added to u, G blocks of padded_width(H). Unless */            \
  /* `packed`, wf, wi and wr are W_hh, W_ih and W_hr as stored. */                           \
  template <typename S, typename Cell>                                                        \
  void forward_rows(const ForwardParams<S>& p, int64_t d, int64_t n0, int64_t n1,             \
                    const S* wf, const S* wi, const S* wr, const S* bu, S* scratch,           \
                    bool packed);                                                             \
  /* wb: W_hh packed; wr: W_hr packed, or null; unless `packed`, as stored. */               \
  template <typename S, typename Cell>                                                        \
  void backward_rows(const BackwardParams<S>& p, int64_t d, int64_t n0, int64_t n1,           \
                     const S* wb, const S* wr, S* scratch, bool packed);                      \
  /* One thread's share of a step of the column-split loops (recurrence_cpu_kernels.h); */  \
  /* unless `packed`, the weights as stored, whole. */                                        \
  template <typename S, typename Cell>                                                        \
  void forward_columns(const ForwardParams<S>& p, int64_t d, int64_t t, int64_t j0,          \
                       int64_t nu, const S* wf, const S* wi, const S* bu, const S* prev,     \
                       S* next, S* cs, S* m, S* gates, S* rows, bool packed);                 \
  template <typename S, typename Cell>                                                        \
  void project_columns(const ForwardParams<S>& p, int64_t d, int64_t t, int64_t k0,          \
                       int64_t np, const S* wr, const S* m, const S* prev, S* next, S* tmp,  \
                       bool packed);                                                          \
  template <typename S, typename Cell>                                                        \
  void backward_columns(const BackwardParams<S>& p, int64_t d, int64_t t, int64_t j0,        \
                        int64_t nu, const S* wr, const S* dh, S* dh_next, S* dc, S* gp,      \
                        S* gm);                                                               \
  /* Units [j0, j1) of a few rows' weight gradients; columns [c0, c1) of rows [r0, r1) */     \
  /* of their dx. */                                                                          \
  template <typename S>                                                                       \
  void weight_grads(const WeightGradParams<S>& p, int64_t j0, int64_t j1);                    \
  template <typename S>                                                                       \
  void input_grad(const WeightGradParams<S>& p, int64_t r0, int64_t r1, int64_t c0,           \
                  int64_t c1);                                                                \
  /* Units [j0, j1) of dW = g^T z, g (R, GH), z the Ra rows of a then those of b (each */ \
  /* lda, ldb apart, C columns); rows [r0, r1) of dx = g W_ih, or dx += g W_ih where */    \
  /* `add`. */                                                                               \
  template <typename S>                                                                       \
  void narrow_weight_grad(const S* g, int64_t R, int64_t GH, const S* a, int64_t lda,        \
                          int64_t Ra, const S* b, int64_t ldb, int64_t C, S* dw, int64_t j0, \
                          int64_t j1);                                                        \
  template <typename S>                                                                       \
  void narrow_input_grad(const S* g, int64_t GH, const S* w, int64_t C, S* dx, bool add,     \
                         int64_t r0, int64_t r1);                                             \
  /* The multiply-add probe of the roofline: lane FMAs done in `rounds`. */                  \
  int64_t fma_probe_entry(int64_t rounds, float* sink);                                       \
  template <typename S, typename Cell>                                                        \
  void carry_columns(const BackwardParams<S>& p, int64_t d, int64_t t, int64_t k0,           \
                     int64_t np, const S* wb, const S* dh, S* dh_next, S* tmp, S* rows);      \
  }                                                                                           \
  }                                                                                           \
  }

FASTRNN_DECLARE_CPU_ISA(base)
FASTRNN_DECLARE_CPU_ISA(avx2)
FASTRNN_DECLARE_CPU_ISA(avx512)
