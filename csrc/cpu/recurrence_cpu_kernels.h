// The CPU time loops, written once for every cell and compiled once per
// instruction set.
//
// Each recurrence_cpu_<isa>.cpp includes this file after a `#pragma GCC
// target`, having defined
//   FASTRNN_CPU_ISA    the namespace these kernels land in (avx512, avx2, base)
//   FASTRNN_VEC_BYTES  the width of one vector register in bytes
// and, in that namespace, the vector functions exp_vec and tanh_vec (double),
// reciprocal (float: 1 / q, or an estimate of it where the instruction set
// has one), lesser and greater (float: a < b ? a : b and a > b ? a : b, b
// where either is NaN) on GCC vectors of FASTRNN_VEC_BYTES bytes. Nothing
// here may use a template from the standard library: an out-of-line copy
// compiled for AVX-512 could be picked by the linker for every caller.
//
// One step of a block of rows is a small GEMM (rows x C times C x G*H for
// the input term x W_ih^T, and rows x P times P x G*H for h W_hh^T, summed in
// the same accumulators except for the gates a cell takes apart) followed by
// the cell's pointwise step, vectorised across units; the block
// of rows is carried through all T steps, so a thread touches only its own
// rows and no step needs a barrier. The caller packs the weights once (pack)
// and gives each call the scratch scratch_per_row() asks for: nothing here
// allocates.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cells.h"
#include "cpu/recurrence_cpu_tiles.h"
#include "recurrence_params.h"

namespace fastrnn {
namespace cpu {
namespace FASTRNN_CPU_ISA {

template <typename S>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(FASTRNN_VEC_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(FASTRNN_VEC_BYTES)));
};

// Two vectors of units stepped as one (Twin<V>, or Twin<Twin<V>> for
// four): every operation on the halves side by side, so that their
// dependency chains interleave in the instruction stream. A cell's
// pointwise step is one long chain (three sigmoids and a tanh, then the
// cell state's tanh): a vector at a time, the core waits on its latency,
// and the steps of the next vectors come too late in the stream for the
// scheduler to fill the wait. Each lane's arithmetic is the same whatever
// its vector is stepped with (the same operations in the same order; the
// cells name which product of a sum they fuse, M::mul_add), so the bits do
// not depend on the grouping.
template <typename V>
struct Twin {
  V a, b;
};
template <typename T>
struct IsTwin : std::false_type {};
template <typename V>
struct IsTwin<Twin<V>> : std::true_type {};
template <typename T, typename U>
using IfScalar = std::enable_if_t<std::is_arithmetic_v<U>, T>;

#define FASTRNN_TWIN_OPERATOR(op)                                                              \
  template <typename V>                                                                        \
  inline Twin<V> operator op(const Twin<V>& x, const Twin<V>& y) {                           \
    return {x.a op y.a, x.b op y.b};                                                           \
  }                                                                                            \
  template <typename V, typename U>                                                            \
  inline IfScalar<Twin<V>, U> operator op(const Twin<V>& x, U y) {                            \
    return {x.a op y, x.b op y};                                                               \
  }                                                                                            \
  template <typename V, typename U>                                                            \
  inline IfScalar<Twin<V>, U> operator op(U x, const Twin<V>& y) {                            \
    return {x op y.a, x op y.b};                                                               \
  }
FASTRNN_TWIN_OPERATOR(+)
FASTRNN_TWIN_OPERATOR(-)
FASTRNN_TWIN_OPERATOR(*)
#undef FASTRNN_TWIN_OPERATOR
template <typename V>
inline Twin<V> operator-(const Twin<V>& x) {
  return {-x.a, -x.b};
}

// What the activations need beyond arithmetic, on a vector or a Twin.
// a < b ? x : y, lane by lane (false where either is NaN).
template <typename V>
inline V select_less(V a, V b, V x, V y) {
  if constexpr (IsTwin<V>::value)
    return {select_less(a.a, b.a, x.a, y.a), select_less(a.b, b.b, x.b, y.b)};
  else
    return a < b ? x : y;
}
// a <= b ? x : y.
template <typename V>
inline V select_less_equal(V a, V b, V x, V y) {
  if constexpr (IsTwin<V>::value)
    return {select_less_equal(a.a, b.a, x.a, y.a), select_less_equal(a.b, b.b, x.b, y.b)};
  else
    return a <= b ? x : y;
}
// float's bits: x & mask, x | (y & mask).
template <typename V>
inline V and_bits(V x, int mask) {
  if constexpr (IsTwin<V>::value) {
    return {and_bits(x.a, mask), and_bits(x.b, mask)};
  } else {
    typedef int Bits __attribute__((vector_size(sizeof(V))));
    return (V)((Bits)x & mask);
  }
}
template <typename V>
inline V or_bits_of(V x, V y, int mask) {
  if constexpr (IsTwin<V>::value) {
    return {or_bits_of(x.a, y.a, mask), or_bits_of(x.b, y.b, mask)};
  } else {
    typedef int Bits __attribute__((vector_size(sizeof(V))));
    return (V)((Bits)x | ((Bits)y & mask));
  }
}
// 2^n from nm = n + magic (exp_parts()).
template <typename V>
inline V power_of_two(V nm, V magic) {
  if constexpr (IsTwin<V>::value) {
    return {power_of_two(nm.a, magic.a), power_of_two(nm.b, magic.b)};
  } else {
    typedef int Bits __attribute__((vector_size(sizeof(V))));
    return (V)(((Bits)nm - (Bits)magic + 127) << 23);
  }
}
template <typename V>
inline Twin<V> reciprocal(const Twin<V>& q) {
  return {reciprocal(q.a), reciprocal(q.b)};
}
template <typename V>
inline Twin<V> lesser(const Twin<V>& x, const Twin<V>& y) {
  return {lesser(x.a, y.a), lesser(x.b, y.b)};
}
template <typename V>
inline Twin<V> greater(const Twin<V>& x, const Twin<V>& y) {
  return {greater(x.a, y.a), greater(x.b, y.b)};
}
template <typename V>
inline Twin<V> multiply_add(const Twin<V>& a, const Twin<V>& b, const Twin<V>& c) {
  return {multiply_add(a.a, b.a, c.a), multiply_add(a.b, b.b, c.b)};
}

// float's tanh and sigmoid, in vector registers (the C library's tanhf
// costs about 20 times more per element here), both from exp: within 3 ulp
// over the whole range, and as accurate as the C library's where they
// saturate. That is where it counts: the backward takes their derivatives
// from the outputs, 1 - y^2 and s (1 - s), which lose to cancellation what
// y and s get wrong near 1. A rational approximation of tanh (4-6 ulp, and
// sigmoid as 1/2 + tanh(x/2)/2) took about three quarters of the time, but
// left those derivatives 5-10 times less accurate than torch's (a tanh
// RNN's gradients through units with |x| > 2), and its sigmoid of x < -10
// was off by thousands of ulp, 0 below -17.
//
// exp(z) = s (1 + em) with s = 2^n, n = round(z / ln 2) (adding 1.5 * 2^23
// rounds to an integer, whose bits then give s), and em = expm1(r) of r =
// z - n ln 2 (ln 2 in two parts, so that r is exact to float's precision),
// |r| <= ln(2)/2, by its Taylor polynomial of degree 7 (the remainder is
// below 2e-8 of em). z in [-88, 88], so that s is a normal float or 0
// (n = -127). NaN stays NaN.
template <typename V>
inline void exp_parts(V z, V& s, V& em) {
  const V magic = V{} + 12582912.f;
  const V nm = z * 1.44269504088896341f + magic;
  const V n = nm - magic;
  V r = z - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  // Estrin's scheme: the terms in pairs, a shorter chain than Horner's.
  const V r2 = r * r, r4 = r2 * r2;
  const V p01 = r * (1.f / 6) + 0.5f, p23 = r * (1.f / 120) + 1.f / 24;
  const V p45 = r * (1.f / 5040) + 1.f / 720;
  em = r + r2 * (p01 + r2 * p23 + r4 * p45);
  s = power_of_two(nm, magic);
}

// 1 / q refined once by its residual, 1 - q r, exact with a fused
// multiply-add: from the instruction set's reciprocal() (on x86 an
// estimate of 14 bits, or of 12 and a Newton step), to float's precision.
template <typename V>
inline V refined_reciprocal(V q) {
  const V r = reciprocal(q);
  return r + r * (1.f - q * r);
}

// tanh(x) = d / (d + 2) with d = expm1(2|x|) below |x| = atanh(1/2), where
// d keeps its relative precision near 0 (and a zero its sign), and
// 1 - 2 / (d + 2) above, where y's error is that of the small 2 / (d + 2)
// and y is within an ulp of tanh; then x's sign. |x| is clamped to 9.1,
// past which tanh rounds to 1, which also maps inf there; NaN passes the
// clamp (its comparison fails) and every step after as NaN.
template <typename V>
inline V tanh_float(V x) {
  const V ax = and_bits(x, 0x7fffffff);
  const V a = lesser(V{} + 9.1f, ax);
  V s, em;
  exp_parts(a + a, s, em);
  const V d = s * em + (s - 1.f);
  const V r = refined_reciprocal(d + 2.f);
  const V y = select_less(a, V{} + 0.549306144f, d * r, 1.f - 2.f * r);
  return or_bits_of(y, x, int(0x80000000));
}

// sigmoid(x) = 1 / (1 + exp(-x)), x clamped to [-88, 88] (past 88 it
// rounds to 1; below -88, where exp(-x) would overflow, it is 0, as
// torch's is from -88.7 on; NaN passes).
template <typename V>
inline V sigmoid_float(V x) {
  const V lo = V{} - 88.f;
  const V a = greater(lo, lesser(V{} + 88.f, x));
  V s, em;
  exp_parts(-a, s, em);
  const V y = refined_reciprocal(s * em + s + 1.f);
  return select_less(x, lo, V{}, y);
}

// The cells' math on vectors of units, or Twins of them (float's only)
// (cells.h): float's tanh and sigmoid are the ones above, double's tanh
// and exp the instruction set's.
template <typename Scalar, typename Vec = typename VecOf<Scalar>::type>
struct VecMath {
  using S = Scalar;
  using V = Vec;
  static_assert(sizeof(S) == 4 || !IsTwin<V>::value, "double's vectors step one at a time");
  static inline V tanh(V x) {
    if constexpr (sizeof(S) == 4) return tanh_float(x);
    else return tanh_vec(x);
  }
  // double: 1 / (1 + exp(-x)) with the instruction set's exp. float's and
  // double's give 0 at -inf, 1 at inf and keep NaN.
  static inline V sigmoid(V x) {
    if constexpr (sizeof(S) == 4) return sigmoid_float(x);
    else return S(1) / (S(1) + exp_vec(-x));
  }
  // `x < 0 ? 0 : x` keeps NaN, as torch.relu does.
  static inline V relu(V x) { return select_less(x, V{}, V{}, x); }
  // torch's threshold_backward: zero where the output is <= 0.
  static inline V relu_backward(V g, V h) { return select_less_equal(h, V{}, V{}, g); }
  // The instruction set's: fused where it has fused multiply-adds.
  static inline V mul_add(V a, V b, V c) { return multiply_add(a, b, c); }
};

// Lane indices 0 .. n-1 as a parameter pack (for __builtin_shufflevector).
template <int... M>
struct Lanes {};
template <int n, int... M>
struct LaneSeqOf : LaneSeqOf<n - 1, n - 1, M...> {};
template <int... M>
struct LaneSeqOf<0, M...> {
  using type = Lanes<M...>;
};
template <int64_t n>
using LaneSeq = typename LaneSeqOf<int(n)>::type;

template <typename S, typename Cell>
struct Kernels {
  using V = typename VecOf<S>::type;
  using M = VecMath<S>;
  static constexpr int G = Cell::kGates;
  static constexpr int64_t W = FASTRNN_VEC_BYTES / sizeof(S);  // lanes per vector
  // Vector registers: 32 with AVX-512, 16 below it.
  static constexpr int kRegisters = FASTRNN_VEC_BYTES == 64 ? 32 : 16;
  // Rows per register block: RB x 2 accumulators, plus two panel vectors and
  // a broadcast, fill the kRegisters vector registers without spilling.
  static constexpr int RB = FASTRNN_VEC_BYTES == 64 ? 8 : 4;
  // The most rows rows() puts in one block: with 16 registers, 6 (12
  // accumulators, two panel vectors and a broadcast: 15), where RB's 4 rows
  // leave 8 multiply-add chains, just the two pipes' latency, and any stall
  // idles a pipe; with 32, RB.
  static constexpr int kRowBlock = kRegisters == 32 ? RB : 6;
  // A cell whose step is a function of its one gate's pre-activation alone
  // (Elman): the step runs on the GEMM's accumulators in registers.
  static constexpr bool kFusable =
      G == 1 && !Cell::kCellState && !Cell::kHiddenBias && !Cell::kPrevState && Cell::kSaved == 0;

  static inline V load(const S* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(S* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  // v as a register operand: a vector loaded once for several multiply-adds
  // stays loaded, where the compiler would otherwise fold the load into
  // each of them and read it again for every one (a block of 2 rows over 8
  // weight rows: 18 loads for 16 multiply-adds, not 10). Only for blocks
  // whose accumulators leave room for the vectors (keeps_vectors()): with
  // AVX2's 16 registers a 4 x 4 block's accumulators fill them, and the
  // folded loads are what keeps them from spilling.
  static inline V in_register(V v) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__("" : "+v"(v));
#endif
    return v;
  }
  // Whether a block of R rows, R x N accumulators, keeps the N vectors it
  // multiplies every row by in registers (in_register()).
  static constexpr bool keeps_vectors(int R, int N) { return R > 1 && R * N + N < kRegisters; }
  // The first n (1 to W) lanes, the others zero; and their store. A unit's
  // value never depends on where it falls: the lanes past n run through the
  // same vector code as the rest.
  static inline V load_n(const S* p, int64_t n) {
    if (n == W) return load(p);
    V v = V{};
    std::memcpy(&v, p, sizeof(S) * n);
    return v;
  }
  static inline void store_n(S* p, V v, int64_t n) {
    if (n == W) return store(p, v);
    std::memcpy(p, &v, sizeof(S) * n);
  }

  // Columns padded to whole vectors: the width of every scratch row.
  static int64_t padded(int64_t J) { return (J + W - 1) / W * W; }

  // Panel widths of a packed matrix: 2W while they fit, then W.
  static inline int64_t panel_width(int64_t j, int64_t Jp) { return j + 2 * W <= Jp ? 2 * W : W; }

  // Packs b (K x Gb*J) into column panels, each K x width and contiguous.
  // The columns come in Gb blocks of J (the gates of a W_hh^T), each block
  // zero-padded to padded(J) so that every block starts on a whole vector:
  // out holds K * Gb * padded(J). Column j of block blk is column blk * bs + j
  // of the source (bs = J for a whole matrix, H for a slice of units), and
  // b[k][col] is src[k * sk + col * sc], so the same routine packs a matrix
  // or its transpose. A step then reads its weights in order instead of at a
  // stride, which maps a whole column of a large b onto a few cache sets.
  // Only the panels that start in columns [c0, c1) of out are written, so
  // that threads can pack parts of one matrix.
  static void pack(const S* src, int64_t sk, int64_t sc, int64_t K, int64_t J, int64_t Gb,
                   int64_t bs, S* out, int64_t c0, int64_t c1) {
    const int64_t Jb = padded(J), Jp = Gb * Jb;
    int64_t from[2 * W];  // a panel column's offset in src, or -1 in the padding
    for (int64_t j0 = 0; j0 < Jp && j0 < c1; j0 += panel_width(j0, Jp)) {
      const int64_t w = panel_width(j0, Jp);
      if (j0 < c0) continue;
      for (int64_t c = 0; c < w; ++c) {
        const int64_t blk = (j0 + c) / Jb, j = j0 + c - blk * Jb;
        from[c] = j < J ? (blk * bs + j) * sc : -1;
      }
      S* panel = out + j0 * K;
      int64_t k = 0;
      // Where src is the transpose (W_hh^T read from W_hh as stored), a
      // column is contiguous: W of them, W rows at a time, transposed in
      // registers. One element at a time, down a column, each line of a
      // panel larger than L1 was fetched again for every column (a GRU of
      // hidden 512 at batch 64, one step: half of its no-grad call).
      if (sk == 1) {
        for (; k + W <= K; k += W) {
          for (int64_t cb = 0; cb < w; cb += W) {
            V r[W];
            for (int64_t c = 0; c < W; ++c) {
              const int64_t f = from[cb + c];
              if (f < 0) {
                r[c] = V{};
                continue;
              }
              r[c] = load(src + f + k);
              if (k + kPackAhead < K) __builtin_prefetch(src + f + k + kPackAhead);
            }
            transpose(r, LaneSeq<W>{});
            for (int64_t i = 0; i < W; ++i) store(panel + (k + i) * w + cb, r[i]);
          }
        }
      }
      // Where src is the matrix as stored (W_hh for the backward's dh), a
      // row of a panel is a run of src's row: W columns a vector, the first
      // n of them from src and the rest padding (a block's last vector), or
      // 0 where the run breaks (then one element at a time). One element at
      // a time throughout, this was most of a GRU's pack at hidden 512.
      int64_t run[2] = {0, 0};
      if (sc == 1) {
        for (int64_t cb = 0; cb < w; cb += W) {
          int64_t n = 0;
          while (n < W && from[cb + n] >= 0 && from[cb + n] == from[cb] + n) ++n;
          bool rest_padding = true;
          for (int64_t c = n; c < W; ++c) rest_padding = rest_padding && from[cb + c] < 0;
          run[cb / W] = rest_padding ? n : 0;
        }
      }
      // The rest: along a row of src, or the last K % W rows of a column.
      for (; k < K; ++k) {
        const S* row = src + k * sk;
        for (int64_t cb = 0; cb < w; cb += W) {
          const int64_t n = run[cb / W];
          if (n > 0) {
            if (k + kRowsAhead < K) __builtin_prefetch(row + kRowsAhead * sk + from[cb]);
            store(panel + k * w + cb, load_n(row + from[cb], n));
          } else {
            for (int64_t c = cb; c < cb + W; ++c)
              panel[k * w + c] = from[c] < 0 ? S(0) : row[from[c]];
          }
        }
      }
    }
  }
  // How far ahead of its loads pack() prefetches a column: W columns of
  // W elements a block are too short a stream each for the hardware. Two
  // vectors ahead of each of a panel's 2W columns; further ahead ran
  // slower (16 vectors as slow as none). Measured here
  // (one thread, no-grad, 5 steps of batch 1, interleaved in one process,
  // ahead 0 / 1 / 2 / 4 / 16 vectors): LSTM 32->1024 4.95 / 4.22 / 4.05 /
  // 4.54 / 4.96 ms, RNN 32->1024 0.64 / 0.58 / 0.56 / 0.59 / 0.64 ms.
  static constexpr int64_t kPackAhead = 2 * W;
  // And how many rows ahead it prefetches a run of a row.
  static constexpr int64_t kRowsAhead = 8;

  // Lane m of the zip of x and y: lanes x0 y0 x1 y1 ... from the first
  // halves (upper: the second halves).
  static constexpr int zip_lane(int m, bool upper) {
    return (m % 2 ? int(W) : 0) + m / 2 + (upper ? int(W) / 2 : 0);
  }
  // Transposes the W x W block r: lane c of r[i] becomes lane i of r[c].
  // Each round zips vector i with vector i + W/2 into 2i and 2i + 1, which
  // rotates the bits of (vector, lane) by one; log2(W) rounds swap them.
  template <int... Ms>
  static inline __attribute__((always_inline)) void transpose(V (&r)[W], Lanes<Ms...>) {
    for (int64_t round = 1; round < W; round *= 2) {
      V t[W];
#pragma GCC unroll 16
      for (int64_t i = 0; i < W / 2; ++i) {
        t[2 * i] = __builtin_shufflevector(r[i], r[i + W / 2], zip_lane(Ms, false)...);
        t[2 * i + 1] = __builtin_shufflevector(r[i], r[i + W / 2], zip_lane(Ms, true)...);
      }
#pragma GCC unroll 16
      for (int64_t i = 0; i < W; ++i) r[i] = t[i];
    }
  }

  // What a GEMM does with its result: store it in c (kStore), add it to c
  // (kAccumulate), or store the fused cell step of it (kFused: h =
  // cell(acc + b) into c and into out; pointers at the block's first row
  // and column).
  enum Mode { kStore, kAccumulate, kFused };
  struct Epilogue {
    S* out = nullptr;
    int64_t ldo = 0;
    const S* b = nullptr;  // the input bias of the block's columns
    Epilogue shifted(int64_t r, int64_t j) const {
      return out ? Epilogue{out + r * ldo + j, ldo, b + j} : *this;
    }
  };

  // One operand of a GEMM: a (R x K, rows lda apart) times a K x Jp matrix
  // packed by pack(), whose column panel j0 starts at packed + j0 * K. K may
  // be 0: no operand. pf: where a block of rows prefetches into L2 while it
  // runs, pf_step bytes a k (below), or null.
  struct Operand {
    const S* a = nullptr;
    int64_t lda = 0;
    const S* packed = nullptr;
    int64_t K = 0;
    const char* pf = nullptr;
    int64_t pf_step = 0;
    Operand rows_from(int64_t r) const { return K ? Operand{a + r * lda, lda, packed, K} : *this; }
    const S* panel(int64_t j0) const { return packed + j0 * K; }
    // The block of rows [r, r + n) of R over a panel prefetches the same
    // share of the next panel (columns [j0, j0 + w); none where w is 0).
    Operand prefetching(int64_t j0, int64_t w, int64_t r, int64_t n, int64_t R) const {
      if (K == 0 || w == 0) return *this;
      const int64_t bytes = K * w * static_cast<int64_t>(sizeof(S));
      const int64_t slice = (bytes * n + R - 1) / R;
      Operand o = *this;
      o.pf = reinterpret_cast<const char*>(panel(j0)) + bytes * r / R;
      o.pf_step = (slice + K - 1) / K;
      return o;
    }
    // The columns from gate block b on, blocks Jb wide.
    Operand from_block(int64_t b, int64_t Jb) const {
      return K ? Operand{a, lda, packed + b * Jb * K, K} : *this;
    }
  };

  static inline V fused_step(V acc, V u) {
    V h, unused{}, none{};
    Cell::template forward<M, V>(&u, &acc, &none, unused, unused, h, &none);
    return h;
  }

  // acc (R x JV*W) += a (R x K) panel (K x JV*W), and pf's slice of the
  // next panel into L2, up to two lines a k. Where the weights pass what L3
  // holds, the first block of rows over a panel would otherwise wait on
  // memory (LSTM hidden 1024, batch 64: 16 MB a step).
  // More than two vectors (JV = 2 * panels) span consecutive whole panels,
  // 2W * K apart: a block of fewer rows than RB (few_rows()).
  template <int R, int JV>
  static inline __attribute__((always_inline)) void madd(V (&acc)[R][JV], int64_t K, const S* a,
                                                         int64_t lda, const S* panel,
                                                         const char* pf, int64_t pf_step) {
    constexpr int PV = JV < 2 ? JV : 2;  // vectors a panel holds at each k
    const int64_t ps = 2 * W * K;
    for (int64_t k = 0; k < K; ++k) {
      if (pf != nullptr) {
        __builtin_prefetch(pf + k * pf_step, 0, 2);
        if (pf_step > 64) __builtin_prefetch(pf + k * pf_step + 64, 0, 2);
      }
      V bv[JV];
#pragma GCC unroll 16
      for (int v = 0; v < JV; ++v) {
        bv[v] = load(panel + (v / 2) * ps + (k * PV + v % 2) * W);
        if constexpr (keeps_vectors(R, JV)) bv[v] = in_register(bv[v]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const S ar = a[r * lda + k];
#pragma GCC unroll 16
        for (int v = 0; v < JV; ++v) acc[r][v] += ar * bv[v];
      }
    }
  }

  // c (R x JV*W) = x-operand times its panel j0, then plus the h-operand's
  // (always in that order); the accumulators stay in registers. kFused: the
  // caller guarantees its JV*W columns all lie inside out.
  template <int R, int JV, Mode MODE>
  static inline void block(const Operand& x, const Operand& h, int64_t j0, S* c, int64_t ldc,
                           const Epilogue& e) {
    V acc[R][JV];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < JV; ++v) acc[r][v] = V{};
    madd<R, JV>(acc, x.K, x.a, x.lda, x.panel(j0), x.pf, x.pf_step);
    madd<R, JV>(acc, h.K, h.a, h.lda, h.panel(j0), h.pf, h.pf_step);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int v = 0; v < JV; ++v) {
        V val = acc[r][v];
        if constexpr (MODE == kFused) {
          val = fused_step(val, load(e.b + v * W));
          store(e.out + r * e.ldo + v * W, val);
        } else if constexpr (MODE == kAccumulate) {
          val += load(c + r * ldc + v * W);
        }
        store(c + r * ldc + v * W, val);
      }
    }
  }

  // f(std::integral_constant<int, N>{}) for the N in [Lo, Hi] equal to n,
  // nothing where none is: a count known at run time as a block's template
  // argument.
  template <int Lo, int Hi, typename F>
  static inline __attribute__((always_inline)) void with_count(int64_t n, const F& f) {
    if constexpr (Lo <= Hi) {
      if (n == Lo) return f(std::integral_constant<int, Lo>{});
      with_count<Lo + 1, Hi>(n, f);
    }
  }

  // Rows in blocks of RB, then the rest in one block over the same panel
  // while it is in L1, RB + 1 rows where one would be left over: in blocks
  // of 4, 2 and 1, a row past a whole block ran on two multiply-add chains
  // alone, and 7 rows took three blocks of 8, 4 and 2 chains one after
  // another. Each sum runs as in any other block, so the results' bits are
  // the same. Measured here (LSTM 256, input 32, 128 steps, no-grad, one
  // thread, the builds alternating three times, medians, blocks of
  // 4-2-1 / one): batch 9 4.32 / 3.47 ms, 11 5.69 / 4.86, 13 6.00 / 5.07,
  // 15 7.31 / 5.72, 17 7.29 / 6.43; batch 8, 10, 12 and 16 within 0.99x-
  // 1.03x; GRU 256 and LSTM 1024 alike, and on two threads. Blocks of 10
  // to 12 rows ran out of registers (1.4x-2.2x as long).
  // Columns [j0, j0 + JV*W) of R rows (c and e at column j0); the blocks
  // share the prefetch of the next panel, columns [jn, jn + wn).
  template <int JV, Mode MODE>
  static inline void rows(int64_t R, const Operand& x, const Operand& h, int64_t j0, S* c,
                          int64_t ldc, const Epilogue& e, int64_t jn, int64_t wn) {
    int64_t r = 0;
    const auto rows_block = [&]<int NR>(std::integral_constant<int, NR>)
                                __attribute__((always_inline)) {
      block<NR, JV, MODE>(x.rows_from(r).prefetching(jn, wn, r, NR, R),
                          h.rows_from(r).prefetching(jn, wn, r, NR, R), j0, c + r * ldc, ldc,
                          e.shifted(r, 0));
    };
    if constexpr (kRowBlock == RB) {
      for (; R - r > RB + 1; r += RB) rows_block(std::integral_constant<int, RB>{});
      with_count<1, RB + 1>(R - r, rows_block);
    } else {
      // As few blocks of at most kRowBlock rows as hold R, as even as they
      // go (8 rows in two of 4, not 6 and 2; 64 in nine of 6 and two of 5).
      // Each sum runs as in any other block: the same bits. Measured on an
      // AMD EPYC of AVX2 alone (Zen 3; input 32, one thread, this split and
      // RB's alternating call by call in one process, medians of the
      // per-pair ratios): no-grad GRU 64 batch 64 1.11x as fast, LSTM 64
      // 1.13x, RNN 64 1.09x, LSTM 256 1.16x, GRU 256 1.07x, hidden 1024
      // 1.00x-1.03x (weights from L3); forward+backward 1.04x-1.05x; two
      // threads 1.03x-1.10x. 8 rows in blocks of 6 and 2 ran 0.7x.
      const int64_t blocks = (R + kRowBlock - 1) / kRowBlock;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n = R / blocks + (b < R % blocks ? 1 : 0);
        with_count<1, kRowBlock>(n, rows_block);
        r += n;
      }
    }
  }

  // R < RB rows over np whole panels from j0 (c and e at column j0): all
  // R rows in one block over each group of panels, as many panels as keep
  // the accumulators within a whole block's 2 * RB (1 row over 8 panels, 2
  // over 4, 3 and 4 over 2, 5 to 7 over one, with AVX-512). A block of a
  // few rows over one panel has too few to hide the multiply-add latency
  // (one row: two chains), and its broadcasts serve fewer columns. Each sum
  // runs as in block() over one panel, so the results' bits are the same.
  // Measured here (one thread, input 32, 128 steps, medians of three
  // processes each, one panel a block / groups): no-grad LSTM 64 batch 1
  // 0.183 / 0.159 ms, LSTM 128 batch 2 0.740 / 0.549, GRU 64 batch 1 0.141
  // / 0.120, RNN 64 batch 1 0.042 / 0.034; forward+backward 5-18% faster;
  // batch 4 even.
  template <int NR, int NP, Mode MODE>
  static inline void few_rows_panels(const Operand& x, const Operand& h, int64_t j0, int64_t np,
                                     S* c, int64_t ldc, const Epilogue& e) {
    int64_t q = 0;
    for (; q + NP <= np; q += NP)
      block<NR, 2 * NP, MODE>(x, h, j0 + q * 2 * W, c + q * 2 * W, ldc, e.shifted(0, q * 2 * W));
    if constexpr (NP > 1) {
      if (q < np)
        few_rows_panels<NR, NP / 2, MODE>(x, h, j0 + q * 2 * W, np - q, c + q * 2 * W, ldc,
                                          e.shifted(0, q * 2 * W));
    }
  }
  // The panels a block of NR rows spans: the largest power of two that
  // keeps its accumulators within 2 * RB.
  static constexpr int group_panels(int NR) {
    int np = 1;
    while (NR * np * 2 <= RB) np *= 2;
    return np;
  }
  // The panels in chunks of RB, the most a block spans, for back: the
  // chunks from the last (gemm()). All the rows run in one pass over the
  // panels: in blocks of 4, 2 and 1 rows, each over every panel in turn, a
  // step of 7 rows read weights larger than L2 three times from L3.
  // Measured here (input 32, no-grad, the builds alternating, blocks of
  // 4-2-1 with the panels in one direction / one block): two threads, 32
  // steps, against nn.LSTM in the same process, LSTM 1024 batch 7 0.38x /
  // 1.06x-1.10x, batch 3 0.51x-0.60x / 1.16x-1.18x, LSTM 512 batch 6
  // 0.65x-0.70x / 1.16x-1.19x; one thread, 128 steps, LSTM 64 batch 7 0.53
  // / 0.41 ms, LSTM 128 batch 6 1.29 / 0.97, GRU 128 batch 7 1.14 / 0.85,
  // RNN 256 batch 5 0.85 / 0.69; batch 2 and 4 the same.
  template <Mode MODE>
  static inline void few_rows(int64_t R, const Operand& x, const Operand& h, int64_t j0,
                              int64_t np, S* c, int64_t ldc, const Epilogue& e, bool back) {
    const int64_t chunks = (np + RB - 1) / RB;
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t q = (back ? chunks - 1 - i : i) * RB, nq = std::min<int64_t>(RB, np - q);
      const int64_t jq = q * 2 * W;
      with_count<1, RB - 1>(R, [&]<int NR>(std::integral_constant<int, NR>)
                                   __attribute__((always_inline)) {
        few_rows_panels<NR, group_panels(NR), MODE>(x, h, j0 + jq, nq, c + jq, ldc,
                                                    e.shifted(0, jq));
      });
    }
  }

  // Panel j0 (w wide), all R rows, prefetching the panel that runs next
  // (jn, wn wide; none where wn is 0).
  template <Mode MODE>
  static inline void panel_rows(int64_t w, int64_t R, const Operand& x, const Operand& h,
                                int64_t j0, int64_t jn, int64_t wn, S* c, int64_t ldc,
                                const Epilogue& e) {
    if (w == 2 * W) rows<2, MODE>(R, x, h, j0, c, ldc, e, jn, wn);
    else rows<1, MODE>(R, x, h, j0, c, ldc, e, jn, wn);
  }

  // f(j0, w, jn, wn) for the panels of a matrix Jp wide from column j0 on
  // (a panel's start), each with the one that runs after it (jn, wn wide;
  // wn 0 after the last): from the first, or from the last where back.
  // Every panel but the last is 2W wide.
  template <typename F>
  static inline void walk_panels(int64_t j0, int64_t Jp, bool back, F&& f) {
    if (!back) {
      for (int64_t j = j0; j < Jp; j += panel_width(j, Jp)) {
        const int64_t jn = j + panel_width(j, Jp);
        f(j, panel_width(j, Jp), jn, jn < Jp ? panel_width(jn, Jp) : 0);
      }
    } else {
      for (int64_t j = Jp % (2 * W) ? Jp - W : Jp - 2 * W; j >= j0; j -= 2 * W)
        f(j, panel_width(j, Jp), j - 2 * W, j - 2 * W >= j0 ? 2 * W : 0);
    }
  }

  // c (R x Jp) = x.a x.b + h.a h.b, or c += that (accumulate), both b packed
  // by pack() into Jp columns. The sums run in the same order for every
  // element (x's k, then h's), so no result depends on where its row or
  // column falls. back: the panels from the last (fewer rows than a
  // register block: their chunks), for the steps that alternate direction
  // (step_gemm()).
  static void gemm(int64_t R, int64_t Jp, const Operand& x, const Operand& h, S* c, int64_t ldc,
                   bool accumulate = false, bool back = false) {
    int64_t j0 = 0;
    if (R < RB) {  // the whole panels in groups, the last one alone below
      const int64_t np = Jp / (2 * W);
      if (accumulate) few_rows<kAccumulate>(R, x, h, 0, np, c, ldc, {}, back);
      else few_rows<kStore>(R, x, h, 0, np, c, ldc, {}, back);
      j0 = np * 2 * W;
    }
    walk_panels(j0, Jp, back, [&](int64_t j, int64_t w, int64_t jn, int64_t wn) {
      if (accumulate) panel_rows<kAccumulate>(w, R, x, h, j, jn, wn, c + j, ldc, {});
      else panel_rows<kStore>(w, R, x, h, j, jn, wn, c + j, ldc, {});
    });
  }
  // c (R x Jp) = a (R x K) b (K x Jp), or c += a b.
  static void gemm(int64_t R, int64_t Jp, int64_t K, const S* a, int64_t lda, const S* packed,
                   S* c, int64_t ldc, bool accumulate = false, bool back = false) {
    gemm(R, Jp, Operand{}, Operand{a, lda, packed, K}, c, ldc, accumulate, back);
  }

  // The fusable cell's step (kFusable): c (R x padded(H)) = cell(x W_ih^T +
  // h W_hh^T + bu) and out = the same on the H real columns, in registers for
  // every panel that lies inside them and element by element for the last.
  // forward() takes it for fewer rows than a register block only: on a whole
  // block the GEMM then the step over its output (step_gemm(),
  // forward_units()), the same sums and bits, ran faster on the Xeon (RNN,
  // input 32, 128 steps, no-grad, one thread, medians of two runs each,
  // fused / not): hidden 256 batch 8 1.41 / 0.98 ms, batch 32 3.86 / 3.41,
  // batch 64 7.2 / 6.7, hidden 128 batch 16 0.66 / 0.56, hidden 512 batch 64
  // 26.1 / 23.6, hidden 1024 batch 8 20.4 / 16.3; two threads (8 rows or
  // more a thread) hidden 128 batch 16 0.47 / 0.34, hidden 256 batch 32 2.31
  // / 1.90, hidden 512 batch 64 14.9 / 12.8. With 2 to 6 rows it ran as
  // fast or a little faster (one thread, hidden 256: batch 2 0.44 / 0.45,
  // batch 6 0.65 / 0.66; two threads, batch 12: 0.72 / 0.76).
  // R < RB: the whole panels inside H in groups (few_rows()), the rest below.
  static void gemm_fused(int64_t R, int64_t H, const Operand& x, const Operand& hw, S* c,
                         int64_t ldc, S* out, int64_t ldo, const S* bu, bool back = false) {
    const int64_t Jp = padded(H);
    const int64_t np = H / (2 * W);  // H <= Jp
    few_rows<kFused>(R, x, hw, 0, np, c, ldc, Epilogue{out, ldo, bu}, back);
    walk_panels(np * 2 * W, Jp, back, [&](int64_t jp, int64_t w, int64_t jn, int64_t wn) {
      if (jp + w <= H) {
        panel_rows<kFused>(w, R, x, hw, jp, jn, wn, c + jp, ldc, Epilogue{out + jp, ldo, bu + jp});
        return;
      }
      panel_rows<kStore>(w, R, x, hw, jp, jn, wn, c + jp, ldc, {});
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t j = jp; j < H; j += W) {
          const int64_t n = H - j < W ? H - j : W;
          const V h = fused_step(load(c + r * ldc + j), load(bu + j));
          store(c + r * ldc + j, h);
          store_n(out + r * ldo + j, h, n);
        }
      }
    });
  }

  // The last kApart gates take their input term apart from the hidden one
  // (GRU's n); the others add them.
  static constexpr int kApart = Cell::kInputApart;

  // f(part) for a step's products in order: the summed gate blocks (part
  // 0), then the hidden part of the gates apart (1), then their input part
  // (2); from the last where back.
  template <typename F>
  static inline void step_parts(bool back, const F& f) {
    constexpr int n = kApart > 0 ? 3 : 1;
    for (int i = 0; i < n; ++i) f(back ? n - 1 - i : i);
  }

  // The gate pre-activations of a step, G + kApart blocks of Jb columns
  // (rows ldg apart): x W_ih^T + h W_hh^T for the first G - kApart gates,
  // h W_hh^T alone for the others, then their x W_ih^T in blocks G onwards.
  // x and h packed in G blocks of Jb. back: the panels from the last
  // (gemm()), as step_dot() walks a lone row's weights: every other step,
  // so that where a thread's panels pass L2 the ones it read last are still
  // there for the next step. Measured here (input 32, batch 8, the builds
  // alternating process by process, three pairs on two threads in two
  // runs, two on one; this / one direction): no-grad forward of 128 steps,
  // two threads, LSTM 1024 0.91-0.95, GRU 1024 0.91-0.92, RNN 1024
  // 0.82-0.88, LSTM 512 0.83-0.85; one thread 0.96, 0.94, 0.83, 0.84;
  // batch 64 within the noise (0.98-1.05). The backward's dh W_hh alike
  // (forward+backward, two threads): LSTM 1024 0.97, GRU 1024 0.97.
  static void step_gemm(int64_t R, int64_t Jb, const Operand& x, const Operand& h, S* gates,
                        int64_t ldg, bool back = false) {
    constexpr int kAdd = G - kApart;
    step_parts(back, [&](int part) {
      if (part == 0) return gemm(R, kAdd * Jb, x, h, gates, ldg, false, back);
      const bool hidden = part == 1;
      gemm(R, kApart * Jb, hidden ? Operand{} : x.from_block(kAdd, Jb),
           hidden ? h.from_block(kAdd, Jb) : Operand{}, gates + (hidden ? kAdd : G) * Jb, ldg,
           false, back);
    });
  }

  // The GEMMs on weights as they are stored, for a call whose rows times
  // steps are too few to repay packing (a cell, one step of a stream):
  // every weight is read once either way, so packing would double what the
  // call moves. Each sum runs in the same order wherever its row and column
  // fall (lane k % W of an accumulator, then the lanes over lane_sums()'
  // tree), so no result depends on the blocks.

  // One factor of a dot-form GEMM: rows of a (lda apart) against rows of a
  // weight matrix as stored, each K wide and contiguous. K may be 0: none.
  // ahead: while a block of weight rows runs, prefetch the next block's
  // into L2 (kDotAheadBytes); back: the blocks run from the last, so the
  // next is the one before.
  struct Rows {
    const S* a = nullptr;
    int64_t lda = 0;
    const S* w = nullptr;
    int64_t K = 0;
    bool ahead = false;
    bool back = false;
    Rows rows_from(int64_t r) const {
      Rows o = *this;
      if (K) o.a += r * lda;
      return o;
    }
    Rows from_row(int64_t i) const {
      Rows o = *this;
      if (K) o.w += i * K;
      return o;
    }
  };
  // The weights a step reads from which the dot form prefetches: where
  // they pass about half of L3 (32 MB on the development machine), with
  // whatever else a program keeps there they come from memory, faster with
  // the next block of rows asked for in advance. Measured here (LSTM
  // 32->1024, batch 1, 128 steps, forward, weights as stored, 17 MB a step,
  // calls interleaved with nn.LSTM's, one thread): 39.4 ms without, 33.9
  // with (two threads 16.6 / 16.4); at 4.7 MB (LSTM 32->512) it ran 5%
  // slower with.
  static constexpr int64_t kDotAheadBytes = int64_t{16} << 20;
  static bool dot_ahead(int64_t weight_elements) {
    return weight_elements * int64_t{sizeof(S)} > kDotAheadBytes;
  }

  // The lane sums of accumulators, all over one tree: lane l plus lane
  // l + w/2 for w = W, W/2, ..., 2, so that no sum depends on how many are
  // reduced together. A level folds two vectors into one: each holds
  // accumulators in segments of w lanes, and the result holds both
  // vectors' segments, interleaved, each half as wide and summed. W
  // accumulators end in one vector, a lane each, after W - 1 vector
  // additions (and twice as many shuffles), where summing each alone takes
  // W - 1 scalar additions, a chain, apiece.
  static constexpr int fold_lane(int m, int w, bool upper) {
    const int h = w / 2, s = m / h;
    return (s % 2 ? int(W) : 0) + s / 2 * w + m % h + (upper ? h : 0);
  }
  template <int w, int... M>
  static inline V fold(V x, V y, Lanes<M...>) {
    return __builtin_shufflevector(x, y, fold_lane(M, w, false)...) +
           __builtin_shufflevector(x, y, fold_lane(M, w, true)...);
  }
  // Folds the first c of v (c a power of two) level by level from width w:
  // vector i with vector i + c/2 while there are two, then the last one
  // with itself (its segments twice over).
  template <int w, int c, int N>
  static inline void fold_levels(V (&v)[N]) {
    if constexpr (w > 1) {
      if constexpr (c > 1)
        for (int i = 0; i < c / 2; ++i) v[i] = fold<w>(v[i], v[i + c / 2], LaneSeq<W>{});
      else
        v[0] = fold<w>(v[0], v[0], LaneSeq<W>{});
      fold_levels<w / 2, (c > 1 ? c / 2 : 1)>(v);
    }
  }
  // out[q] = the sum of acc[q]'s lanes, for N (a power of two) accumulators.
  // After the folds, vector i holds accumulators i + k * N/W in lane k where
  // N >= W; otherwise vector 0 holds accumulator q in lanes q * W/N on.
  template <int N>
  static inline void lane_sums(V (&acc)[N], S (&out)[N]) {
    fold_levels<int(W), N>(acc);
    if constexpr (N >= W) {
      for (int q = 0; q < N; ++q) out[q] = acc[q % (N / W)][q / (N / W)];
    } else {
      for (int q = 0; q < N; ++q) out[q] = acc[0][q * (W / N)];
    }
  }

  // lane_sums() of N accumulators, any N: in groups of the powers of two
  // that make N up (12: 8 and 4). Each accumulator's sum is the same tree
  // in any group, so the bits are those of lane_sums() over any N.
  template <int N, int Off = 0, int M>
  static inline void any_lane_sums(V (&acc)[M], S (&out)[M]) {
    if constexpr (N > 0) {
      constexpr int P = N >= 32 ? 32 : N >= 16 ? 16 : N >= 8 ? 8 : N >= 4 ? 4 : N >= 2 ? 2 : 1;
      V part[P];
      S sums[P];
      for (int q = 0; q < P; ++q) part[q] = acc[Off + q];
      lane_sums<P>(part, sums);
      for (int q = 0; q < P; ++q) out[Off + q] = sums[q];
      any_lane_sums<N - P, Off + P>(acc, out);
    }
  }

  // acc[r * JR + j] += a_r * w_j lane by lane over K, for R rows of a and JR
  // consecutive rows of w from row i.
  template <int R, int JR>
  static inline void dot_madd(V (&acc)[R * JR], const Rows& f, int64_t i) {
    if (f.K == 0) return;
    const S* w = f.w + i * f.K;
    int64_t k = 0;
    for (; k + W <= f.K; k += W) {
      if (f.ahead) {
        // The next block's JR rows follow these (precede them, back): JR
        // lines of them a vector.
        const S* next = (f.back ? w - JR * f.K : w + JR * f.K) + k * JR;
        for (int j = 0; j < JR; ++j) __builtin_prefetch(next + j * W, 0, 2);
      }
      V wv[JR];
#pragma GCC unroll 8
      for (int j = 0; j < JR; ++j) {
        wv[j] = load(w + j * f.K + k);
        if constexpr (keeps_vectors(R, JR)) wv[j] = in_register(wv[j]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V av = load(f.a + r * f.lda + k);
#pragma GCC unroll 8
        for (int j = 0; j < JR; ++j) acc[r * JR + j] += av * wv[j];
      }
    }
    if (k < f.K) {
      const int64_t n = f.K - k;
      V wv[JR];
      for (int j = 0; j < JR; ++j) wv[j] = load_n(w + j * f.K + k, n);
      for (int r = 0; r < R; ++r) {
        const V av = load_n(f.a + r * f.lda + k, n);
        for (int j = 0; j < JR; ++j) acc[r * JR + j] += av * wv[j];
      }
    }
  }

  // c[r][j] = x_r . x.w_(i+j) + h_r . h.w_(i+j) for j < JR.
  template <int R, int JR>
  static inline __attribute__((always_inline)) void dot_block(const Rows& x, const Rows& h,
                                                              int64_t i, S* c, int64_t ldc) {
    V acc[R * JR];
    for (int q = 0; q < R * JR; ++q) acc[q] = V{};
    dot_madd<R, JR>(acc, x, i);
    dot_madd<R, JR>(acc, h, i);
    S sum[R * JR];
    any_lane_sums<R * JR>(acc, sum);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < JR; ++j) c[r * ldc + j] = sum[r * JR + j];
  }

  // Columns i .. i + JR of c's R rows: JR weight rows meet every row of a
  // while they are in L1, in blocks of RR rows, then one row at a time.
  template <int JR, int RR = 4>
  static inline void dot_column(int64_t R, const Rows& x, const Rows& h, int64_t i, S* c,
                                int64_t ldc) {
    int64_t r = 0;
    for (; r + RR <= R; r += RR)
      dot_block<RR, JR>(x.rows_from(r), h.rows_from(r), i, c + r * ldc, ldc);
    for (; r < R; ++r) dot_block<1, JR>(x.rows_from(r), h.rows_from(r), i, c + r * ldc, ldc);
  }

  // Columns lo .. hi of c's rows (hi - lo a multiple of n), n at a time,
  // from the last when back.
  template <int n, int RR = 4>
  static inline void dot_columns(int64_t R, const Rows& x, const Rows& h, int64_t i, S* c,
                                 int64_t ldc, int64_t lo, int64_t hi, bool back) {
    for (int64_t q = 0; q < (hi - lo) / n; ++q) {
      const int64_t j = back ? hi - (q + 1) * n : lo + q * n;
      dot_column<n, RR>(R, x, h, i + j, c + j, ldc);
    }
  }

  // The dot form's register block from four rows on: 4 rows by kDotCols
  // weight rows, the weight vectors kept in registers. 4 x 4 with
  // AVX-512's 32 registers. With AVX2's 16, 4 x 4 leaves no room for the
  // weight vectors (keeps_vectors()), so that each multiply-add loads its
  // own (20 loads for 16 multiply-adds); 4 x 3 keeps them, 12 accumulators
  // and 7 loads for 12 multiply-adds, where 2 x 4 took 6 for 8. Fewer rows
  // go in blocks of 2 rows by 4 weight rows (dot_gemm()). The sums are
  // dot_block()'s for any block, so the bits do not change with it.
  // Measured on an AMD EPYC of AVX2 alone (Zen 3), the AVX2 kernels,
  // no-grad cells, one thread, two blocks alternating call by call in one
  // process. 4 x 4 / 2 x 4, 256->512: RNNCell batch 4 74.5 / 62.9 us,
  // batch 8 146 / 127, batch 16 264 / 196; LSTMCell batch 8 531 / 430, 16
  // 1286 / 1008; GRUCell batch 8 415 / 340; 64->128 batch 8 1.06-1.08x; two
  // threads, batch 8, 1.02-1.09x. 2 x 4 / 4 x 3, medians of the ratio:
  // 256->512 LSTMCell batch 4 1.65x, 5 1.36x, 7 1.18x, 8 1.50x-1.81x, 16
  // 1.58x; GRUCell batch 8 1.67x, 16 (two threads) 1.77x, 32 1.70x;
  // RNNCell batch 8 1.59x, 9 1.44x; 64->128 LSTMCell batch 8 1.33x,
  // GRUCell 1.29x, batch 6 1.15x; LSTMCell 512->1024 batch 8 1.60x; two
  // threads LSTMCell 256->512 batch 8 1.63x; RNNCell 16->16 batch 8 1.00x.
  static constexpr int kDotCols = keeps_vectors(4, 4) ? 4 : 3;

  // The rows' inputs a dot-form GEMM keeps in L2 while the weights pass.
  static constexpr int64_t kDotRowBytes = int64_t{256} << 10;

  // c[r][blk * Jb + j] = x_r . x.w_(blk*bs + j) + h_r . h.w_(blk*bs + j) for
  // Gb blocks of J weight rows, bs rows apart (J for a whole matrix, H for
  // a slice of units); the columns past J of each block are left as they
  // are. Weight rows outermost over chunks of rows whose inputs stay in L2,
  // so that the weights are read from memory once a chunk (rows outermost,
  // an LSTMCell's step at batch 16 read its 32 MB of weights four times).
  // back: the blocks from the last weight row to the first, for a lone row
  // (step_dot() passes it for no other).
  static void dot_gemm(int64_t R, const Rows& x, const Rows& h, int64_t J, int64_t Gb, int64_t bs,
                       int64_t Jb, S* c, int64_t ldc, bool back = false) {
    const int64_t row_bytes = std::max<int64_t>(1, (x.K + h.K) * int64_t{sizeof(S)});
    const int64_t chunk = std::max<int64_t>(4, kDotRowBytes / row_bytes / 4 * 4);
    for (int64_t r0 = 0; r0 < R; r0 += chunk) {
      const int64_t rc = std::min(chunk, R - r0);
      Rows xc = x.rows_from(r0), hc = h.rows_from(r0);
      xc.back = hc.back = back;
      S* cc = c + r0 * ldc;
      for (int64_t b = 0; b < Gb; ++b) {
        const int64_t blk = back ? Gb - 1 - b : b;
        // 2 or 3 rows: eight weight rows a block, over two rows and then the
        // third. In blocks of four weight rows a row at a time, each row
        // read the block's weights on its own. The sums are dot_block()'s
        // whatever the block, so the bits do not change. Measured here (one
        // thread, no-grad, medians of three processes each, blocks of four
        // weight rows / eight): LSTMCell 256->512 batch 2 138 / 107 us,
        // GRUCell alike batch 2 103 / 81 and batch 3 135 / 118, RNNCell
        // batch 2 39.1 / 32.3, one step of LSTM 64->256 batch 2 38.2 / 31.8,
        // the seed shape (9 -> 16, batch 2, 5 steps) LSTM 19.9 / 15.8, GRU
        // 17.1 / 13.7, RNN 11.5 / 10.5 (before dot_madd kept its weight
        // vectors in registers; LSTMCell batch 2 now 96-99 us on an EPYC).
        // A lone row (batch 1) ran as fast either way (LSTMCell 256->512
        // 96-98 / 96 us), and two-row blocks for the rows after the blocks
        // of four (batch 6, 7) no faster than one-row ones: those rows find
        // the weights in L1. Blocks of 8 rows
        // (over 2 or 3 weight rows, so that batch 8 reads the weights in one
        // pass) were no faster on the Xeon (one thread, LSTM step_dot(),
        // blocks of 4 / 8x3 / 8x2): 64->128 batch 8 15.0 / 18.2 / 22.9 us,
        // batch 16 26.6 / 33.9 / 39.1; 256->512 batch 8 341 / 326 / 415,
        // batch 16 596 / 692 / 868; blocks of 8 weight rows by 2 rows, as
        // for batch 2 and 3, took 1.4x-1.9x as long from batch 4 on. Nor
        // was asking for the next block's weights while the second block of
        // rows runs: step_dot() alone on one thread no faster (256->512
        // batch 8, asking / not, 311-440 / 313-339 us), whole cells on two
        // threads 0.77x-0.85x as long at batch 16, within the noise at 8,
        // and 1.06x-1.18x at batch 3 and 6 (a lone row's pass asking).
        // back (a lone row: no blocks of eight) walks the same columns from
        // the last.
        const int64_t i = blk * bs, j8 = rc == 2 || rc == 3 ? J / 8 * 8 : 0;
        const int64_t j4 = j8 + (J - j8) / 4 * 4;
        S* cb = cc + blk * Jb;
        dot_columns<8, 2>(rc, xc, hc, i, cb, ldc, 0, j8, false);
        if (back) dot_columns<1>(rc, xc, hc, i, cb, ldc, j4, J, true);
        if (rc >= 4 && !back) {
          // No blocks of eight from four rows on; back is for a lone row.
          const int64_t jn = J / kDotCols * kDotCols;
          dot_columns<kDotCols, 4>(rc, xc, hc, i, cb, ldc, 0, jn, false);
          dot_columns<1>(rc, xc, hc, i, cb, ldc, jn, J, false);
          continue;
        }
        dot_columns<4, 2>(rc, xc, hc, i, cb, ldc, j8, j4, back);
        if (!back) dot_columns<1>(rc, xc, hc, i, cb, ldc, j4, J, false);
      }
    }
  }

  // step_gemm() on weights as stored: x against W_ih's rows, h against
  // W_hh's, J units of each gate block of H rows (x.w and h.w at the first
  // unit's row of the first block).
  // back: a lone row's weights read from the last row to the first, for
  // the steps that alternate direction (forward()): where a step's weights
  // pass L2, the rows a step read last are still there for the next, where
  // in one direction a slice a little larger than L2 evicts itself every
  // step. The same sums: only the order of the outputs changes. Measured
  // here (input 32, batch 1, 128 steps, no-grad forward, the builds
  // alternating process by process, medians of the per-pair ratios, this
  // / one direction): two threads RNN 1024 0.72, LSTM 1024 0.87, GRU 1024
  // 0.77, LSTM 512 0.74, GRU 512 1.01 (its 2.4 MB fit the two L2s); one
  // thread 0.65, 0.93, 0.90, 0.68, 0.60.
  static void step_dot(int64_t R, int64_t Jb, int64_t J, int64_t H, const Rows& x, const Rows& h,
                       S* gates, int64_t ldg, bool back = false) {
    constexpr int kAdd = G - kApart;
    back = back && R == 1;
    step_parts(back, [&](int part) {
      if (part == 0) return dot_gemm(R, x, h, J, kAdd, H, Jb, gates, ldg, back);
      const bool hidden = part == 1;
      dot_gemm(R, hidden ? Rows{} : x.from_row(kAdd * H), hidden ? h.from_row(kAdd * H) : Rows{},
               J, kApart, H, Jb, gates + (hidden ? kAdd : G) * Jb, ldg, back);
    });
  }

  // c (R x padded(J)) = a (R x K) w (K x J, as stored, rows J apart), or c
  // += that: the axpy form, whole vectors of columns, the last one partial.
  template <int R, int JV, bool kFull>
  static inline void axpy_block(int64_t K, const S* a, int64_t lda, const S* w, int64_t J,
                                int64_t j0, S* c, int64_t ldc, bool accumulate) {
    const int64_t n = kFull ? W : J - j0;
    V acc[R][JV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < JV; ++v) acc[r][v] = V{};
    for (int64_t k = 0; k < K; ++k) {
      V bv[JV];
#pragma GCC unroll 4
      for (int v = 0; v < JV; ++v) bv[v] = load_part<kFull>(w + k * J + j0 + v * W, n);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const S ar = a[r * lda + k];
#pragma GCC unroll 4
        for (int v = 0; v < JV; ++v) acc[r][v] += ar * bv[v];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < JV; ++v) {
        V val = acc[r][v];
        if (accumulate) val += load(c + r * ldc + j0 + v * W);
        store(c + r * ldc + j0 + v * W, val);
      }
  }

  // Columns j0 .. j0 + JV vectors of c's R rows: a strip of w meets every
  // row of a while it is in cache.
  template <int JV, bool kFull>
  static inline void axpy_column(int64_t R, int64_t K, const S* a, int64_t lda, const S* w,
                                 int64_t J, int64_t j0, S* c, int64_t ldc, bool accumulate) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4)
      axpy_block<4, JV, kFull>(K, a + r * lda, lda, w, J, j0, c + r * ldc, ldc, accumulate);
    for (; r < R; ++r)
      axpy_block<1, JV, kFull>(K, a + r * lda, lda, w, J, j0, c + r * ldc, ldc, accumulate);
  }

  // Strips of columns outermost, so that w is read from memory once however
  // many rows there are.
  static void axpy_gemm(int64_t R, int64_t K, const S* a, int64_t lda, const S* w, int64_t J,
                        S* c, int64_t ldc, bool accumulate = false) {
    int64_t j0 = 0;
    for (; j0 + 4 * W <= J; j0 += 4 * W)
      axpy_column<4, true>(R, K, a, lda, w, J, j0, c, ldc, accumulate);
    for (; j0 + W <= J; j0 += W) axpy_column<1, true>(R, K, a, lda, w, J, j0, c, ldc, accumulate);
    if (j0 < J) axpy_column<1, false>(R, K, a, lda, w, J, j0, c, ldc, accumulate);
  }

  // Elements of scratch each block of rows needs per row, forward and
  // backward, for H units, state width P and projections or not.
  static int64_t scratch_per_row(int64_t H, int64_t P, bool proj) {
    const int64_t Hp = padded(H), Pp = padded(P);
    const int64_t fwd = 2 * Pp + (G + kApart) * Hp + (Cell::kCellState ? Hp : 0) + (proj ? Hp : 0);
    const int64_t bwd = 2 * Pp + (Cell::kCellState ? Hp : 0) + (proj ? Pp + Hp : 0);
    return fwd > bwd ? fwd : bwd;
  }

  // The first n lanes at p: a whole vector or Twin (T) where kFull (known
  // at compile time, so that the loop over whole vectors has no branches).
  template <bool kFull, typename T = V>
  static inline T load_part(const S* p, int64_t n) {
    static_assert(kFull || std::is_same_v<T, V>, "a part of a vector");
    if constexpr (kFull) return load_as<T>(p);
    else return load_n(p, n);
  }
  template <bool kFull, typename T = V>
  static inline void store_part(S* p, const T& v, int64_t n) {
    static_assert(kFull || std::is_same_v<T, V>, "a part of a vector");
    if constexpr (kFull) store_as(p, v);
    else store_n(p, v, n);
  }

  // A vector, or a Twin of them, from p on and to p on.
  template <typename T>
  static inline T load_as(const S* p) {
    if constexpr (IsTwin<T>::value) {
      using Half = decltype(T::a);
      return T{load_as<Half>(p), load_as<Half>(p + sizeof(Half) / sizeof(S))};
    } else {
      return load(p);
    }
  }
  template <typename T>
  static inline void store_as(S* p, const T& v) {
    if constexpr (IsTwin<T>::value) {
      using Half = decltype(T::a);
      store_as(p, v.a);
      store_as(p + sizeof(Half) / sizeof(S), v.b);
    } else {
      store(p, v);
    }
  }

  // Units [j, j + n) of a row: T, a vector or a Twin, whole (kFull), or a
  // vector's first n lanes.
  template <bool kFull, typename T = V>
  static inline void forward_chunk(int64_t j, int64_t n, int64_t ld, const S* bu, int64_t bu_ld,
                                   const S* hw, int64_t hw_ld, const S* bh, const S* h_prev,
                                   S* c, S* h, S* out, S* saved) {
    T uv[G], hwv[G], bhv[G], sv[Cell::kSaved > 0 ? Cell::kSaved : 1];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      // The input term of an apart gate g sits in block g + kApart.
      const T b = load_as<T>(bu + g * bu_ld + j);
      uv[g] = g >= G - kApart ? load_as<T>(hw + (g + kApart) * hw_ld + j) + b : b;
      hwv[g] = load_as<T>(hw + g * hw_ld + j);
      bhv[g] = Cell::kHiddenBias && bh != nullptr ? load_part<kFull, T>(bh + g * ld + j, n) : T{};
    }
    const T hp = Cell::kPrevState ? load_as<T>(h_prev + j) : T{};
    T cv = Cell::kCellState ? load_as<T>(c + j) : T{};
    T hv;
    Cell::template forward<VecMath<S, T>, T>(uv, hwv, bhv, hp, cv, hv, sv);
    store_as(h + j, hv);
    if (out != nullptr) store_part<kFull, T>(out + j, hv, n);
    if constexpr (Cell::kCellState) store_as(c + j, cv);
    if (saved == nullptr) return;  // no backward to come
#pragma GCC unroll 4
    for (int k = 0; k < Cell::kSaved; ++k) store_part<kFull, T>(saved + k * ld + j, sv[k], n);
    if constexpr (Cell::kCellState) store_part<kFull, T>(saved + Cell::kSaved * ld + j, cv, n);
  }

  // T (a vector or a Twin of them) with its vector i from p + i * stride:
  // rows of a matrix rather than a row's consecutive vectors.
  template <typename T>
  static inline T load_rows(const S* p, int64_t stride) {
    if constexpr (IsTwin<T>::value) {
      using Half = decltype(T::a);
      return T{load_rows<Half>(p, stride),
               load_rows<Half>(p + int64_t{sizeof(Half) / sizeof(V)} * stride, stride)};
    } else {
      return load(p);
    }
  }
  // Each vector's first n lanes (all W: whole stores).
  template <typename T>
  static inline void store_rows(S* p, int64_t stride, const T& v, int64_t n = W) {
    if constexpr (IsTwin<T>::value) {
      using Half = decltype(T::a);
      store_rows(p, stride, v.a, n);
      store_rows(p + int64_t{sizeof(Half) / sizeof(V)} * stride, stride, v.b, n);
    } else {
      store_n(p, v, n);
    }
  }
  // T with v in every vector.
  template <typename T>
  static inline T splat(const V& v) {
    if constexpr (IsTwin<T>::value) {
      using Half = decltype(T::a);
      return T{splat<Half>(v), splat<Half>(v)};
    } else {
      return v;
    }
  }

  // forward_units() of consecutive rows at once where each row's units fit
  // in one vector (n = H <= W): vector i of T is row i's, so that the rows'
  // activations run side by side as a long row's vectors do in
  // forward_chunk(), with the same operations on each element and so the
  // same bits. Pointers at the first row; *_rs: the rows' strides. A
  // row's step of one vector alone is a chain of dependent operations (the
  // activations) that the rows after it cannot overlap. Measured on an AMD
  // EPYC (input 32, 128 steps, no-grad, one thread, three processes of each
  // build alternating, fastrnn's medians, one row at a time / four): LSTM
  // 16 at batch 64 0.82-0.94 / 0.74-0.76 ms, at batch 8 0.116-0.151 /
  // 0.107-0.126, LSTM 8 at batch 64 0.75-0.91 / 0.69-0.70, RNN 16 0.21-0.26 /
  // 0.185-0.193, GRU 16 0.60-0.73 / 0.56-0.58.
  template <typename T>
  static inline void forward_row_chunk(int64_t n, const S* bu, int64_t bu_ld, const S* hw,
                                       int64_t hw_ld, int64_t hw_rs, const S* bh,
                                       const S* h_prev, int64_t hp_rs, S* c, int64_t c_rs, S* h,
                                       int64_t h_rs, S* out, int64_t out_rs, S* saved,
                                       int64_t saved_rs) {
    T uv[G], hwv[G], bhv[G], sv[Cell::kSaved > 0 ? Cell::kSaved : 1];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const T b = splat<T>(load(bu + g * bu_ld));
      uv[g] = g >= G - kApart ? load_rows<T>(hw + (g + kApart) * hw_ld, hw_rs) + b : b;
      hwv[g] = load_rows<T>(hw + g * hw_ld, hw_rs);
      bhv[g] = Cell::kHiddenBias && bh != nullptr
                   ? splat<T>(load_n(bh + g * n, n))
                   : T{};
    }
    const T hp = Cell::kPrevState ? load_rows<T>(h_prev, hp_rs) : T{};
    T cv = Cell::kCellState ? load_rows<T>(c, c_rs) : T{};
    T hv;
    Cell::template forward<VecMath<S, T>, T>(uv, hwv, bhv, hp, cv, hv, sv);
    store_rows(h, h_rs, hv);
    if (out != nullptr) store_rows(out, out_rs, hv, n);
    if constexpr (Cell::kCellState) store_rows(c, c_rs, cv);
    if (saved == nullptr) return;  // no backward to come
#pragma GCC unroll 4
    for (int k = 0; k < Cell::kSaved; ++k) store_rows(saved + k * n, saved_rs, sv[k], n);
    if constexpr (Cell::kCellState) store_rows(saved + Cell::kSaved * n, saved_rs, cv, n);
  }

  // Vectors a forward_chunk() steps together: four, float only (double's
  // tanh and exp are calls). A vector's step is a chain of dependent
  // operations longer than the processor's window can overlap with the
  // next one's. Measured with AVX-512 (one thread, 64 rows of 64 units, no
  // saved values, both versions in one test program): an LSTM's step 12.6
  // us a vector at a time, 9.9 in fours; a GRU's 8.4 and 6.3; in twos 10%
  // slower than in fours. With AVX2's 16 registers (an AMD EPYC of AVX2
  // alone, no-grad layers, input 32, 128 steps, one thread, the two
  // alternating call by call in one process, medians of the ratio, one at
  // a time / fours): batch 64, LSTM 64 1.08x, GRU 64 1.09x, LSTM 128
  // 1.05x, GRU 128 1.06x, LSTM 256 1.04x, GRU 256 1.02x; hidden 8 (rows
  // in fours, forward_row_chunk()) LSTM 1.24x, GRU 1.34x, RNN 1.47x; LSTM
  // 1024 batch 8 1.00x; in twos 1.00x-1.03x. The backward in fours there
  // 1.00x-1.07x.
  static constexpr int kStepVectors = sizeof(S) == 4 ? 4 : 1;

  // Calls step.operator()<kFull, T>(j, n) over the units [0, units) in
  // chunks: four vectors at a time (T = Twin<Twin<V>>) while kVectors >= 4,
  // then two, then one (T = V), then the partial rest (kFull false, n < W).
  // The callers' lambdas are always_inline: left to GCC, the Elman cell's
  // forward at hidden 64 ran 7% longer (one thread, 64 rows, 2.05 against
  // 2.19 us), its chunk no longer inlined.
  template <int kVectors, typename Step>
  static inline __attribute__((always_inline)) void for_each_chunk(int64_t units,
                                                                   const Step& step) {
    int64_t j = 0;
    if constexpr (kVectors >= 4)
      for (; j + 4 * W <= units; j += 4 * W)
        step.template operator()<true, Twin<Twin<V>>>(j, 4 * W);
    if constexpr (kVectors >= 2)
      for (; j + 2 * W <= units; j += 2 * W) step.template operator()<true, Twin<V>>(j, 2 * W);
    for (; j + W <= units; j += W) step.template operator()<true, V>(j, W);
    if (j < units) step.template operator()<false, V>(j, units - j);
  }

  // The forward step of one row's units [0, units) (pointers at the first):
  // hw, the step_gemm() blocks, and bu, the bias added to the input term,
  // gate blocks hw_ld and bu_ld apart in scratch; saved and bh (kHiddenBias,
  // or null) gate blocks ld apart in global memory; h_prev and c in scratch
  // rows. The new state into h (whole vectors) and, unless null, into out
  // (units wide).
  static void forward_units(int64_t units, int64_t ld, const S* bu, int64_t bu_ld, const S* hw,
                            int64_t hw_ld, const S* bh, const S* h_prev, S* c, S* h, S* out,
                            S* saved) {
    for_each_chunk<kStepVectors>(units, [&]<bool kFull, typename T>(int64_t j, int64_t n)
                                            __attribute__((always_inline)) {
      forward_chunk<kFull, T>(j, n, ld, bu, bu_ld, hw, hw_ld, bh, h_prev, c, h, out, saved);
    });
  }

  // step_gemm() on the matrix unit's tiles in bfloat16 (p.tiles: float32
  // from bfloat16 tensors, with AVX-512's vectors of 16, the tiles' width).
  static void step_tiles(const ForwardParams<S>& p, int64_t d, int64_t R, const S* x, const S* h,
                         int64_t ldh, S* gates, int64_t ldg) {
    if constexpr (std::is_same_v<S, float> && W == 16)
      tile_step(*p.tiles, d, R, x, p.C, h, ldh, gates, ldg);
  }

  // The backward's carry c (+)= dgh W_hh on the tiles (p.tiles, as step_tiles()).
  static void carry_tiles(const BackwardParams<S>& p, int64_t d, int64_t R, const S* dgh,
                          int64_t ld, S* c, int64_t ldc, bool accumulate) {
    if constexpr (std::is_same_v<S, float> && W == 16)
      tile_gemm(*p.tiles, d, R, dgh, ld, G * p.H, c, ldc, accumulate);
  }

  // Rows [n0, n1) of direction d, all T steps. wf: W_hh^T of this direction
  // packed (P x G blocks of padded(H)); wi: W_ih^T alike (C x ...); wr: W_hr^T
  // packed (H x padded(P)), or null without projections; bu: the bias added
  // to the input term, G blocks of padded(H). Unless `packed`, wf, wi and wr
  // are W_hh, W_ih and W_hr as stored.
  static void forward(const ForwardParams<S>& p, int64_t d, int64_t n0, int64_t n1, const S* wf,
                      const S* wi, const S* wr, const S* bu, S* scratch, bool packed) {
    const int64_t T = p.T, N = p.N, H = p.H, P = p.P, DP = p.D * p.P, R = n1 - n0;
    const int64_t Hp = padded(H), Pp = padded(P);
    const int64_t Ws = p.saved != nullptr ? saved_width<Cell>(H) : 0;  // none without a backward
    const bool proj = wr != nullptr;
    const bool ahead = !packed && dot_ahead(G * H * (P + p.C));
    S* prev = scratch;               // (R, Pp) state before the step
    S* next = prev + R * Pp;         // (R, Pp) state after it
    S* gates = next + R * Pp;        // (R, (G+kApart)*Hp) step_gemm()
    const int64_t ldg = (G + kApart) * Hp;
    S* cs = gates + R * ldg;         // (R, Hp) the cell state (kCellState)
    S* m = cs + (Cell::kCellState ? R * Hp : 0);  // (R, Hp) the cell's output (projections)
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(prev + r * Pp, p.h0 + (d * N + n0 + r) * P, sizeof(S) * P);
      if (Cell::kCellState) std::memcpy(cs + r * Hp, p.c0 + (d * N + n0 + r) * H, sizeof(S) * H);
    }
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = d == 0 ? s : T - 1 - s;
      const Operand x{p.x + (t * N + n0) * p.C, p.C, wi, p.C};  // (R, C) of step t
      const Operand hw{prev, Pp, wf, P};
      S* out = p.y + (t * N + n0) * DP + d * P;                         // (R, P), row stride D*P
      S* saved = Ws ? p.saved + ((d * T + t) * N + n0) * Ws : nullptr;  // (R, Ws)
      const bool back = (s % 2 == 1) != p.flip;
      if (kFusable && p.lengths == nullptr && packed && R < RB) {
        gemm_fused(R, H, x, hw, next, Pp, out, DP, bu, back);
      } else {
        if (p.tiles != nullptr) step_tiles(p, d, R, x.a, prev, Pp, gates, ldg);
        else if (packed) step_gemm(R, Hp, x, hw, gates, ldg, back);
        else step_dot(R, Hp, H, H, Rows{x.a, x.lda, wi, p.C, ahead}, Rows{prev, Pp, wf, P, ahead},
                      gates, ldg, back);
        int64_t r0 = 0;
        if constexpr (kStepVectors >= 4) {
          if (H <= W && p.lengths == nullptr) {
            // Rows of one vector of units: four at a time, then two (the rest
            // alone, below).
            const auto rows = [&]<typename T>(int64_t r) __attribute__((always_inline)) {
              forward_row_chunk<T>(H, bu, Hp, gates + r * ldg, Hp, ldg, p.b_hh[d],
                                   prev + r * Pp, Pp, cs + r * Hp, Hp,
                                   proj ? m + r * Hp : next + r * Pp, proj ? Hp : Pp,
                                   proj ? nullptr : out + r * DP, DP,
                                   Ws ? saved + r * Ws : nullptr, Ws);
            };
            for (; r0 + 4 <= R; r0 += 4) rows.template operator()<Twin<Twin<V>>>(r0);
            for (; r0 + 2 <= R; r0 += 2) rows.template operator()<Twin<V>>(r0);
          }
        }
        for (int64_t r = r0; r < R; ++r) {
          if (row_active(p.lengths, n0 + r, t)) {
            forward_units(H, H, bu, Hp, gates + r * ldg, Hp, p.b_hh[d],
                          prev + r * Pp, cs + r * Hp, proj ? m + r * Hp : next + r * Pp,
                          proj ? nullptr : out + r * DP, Ws ? saved + r * Ws : nullptr);
          } else {
            std::memset(out + r * DP, 0, sizeof(S) * P);
            if (Ws) std::memset(saved + r * Ws, 0, sizeof(S) * Ws);
            if (proj) std::memset(m + r * Hp, 0, sizeof(S) * Hp);
          }
        }
        if (proj && packed) gemm(R, Pp, H, m, Hp, wr, next, Pp);
        if (proj && !packed) dot_gemm(R, Rows{}, Rows{m, Hp, wr, H}, P, 1, P, Pp, next, Pp);
        for (int64_t r = 0; r < R; ++r) {
          if (!row_active(p.lengths, n0 + r, t)) {
            std::memcpy(next + r * Pp, prev + r * Pp, sizeof(S) * P);
          } else if (proj) {
            std::memcpy(out + r * DP, next + r * Pp, sizeof(S) * P);
          }
        }
      }
      S* tmp = prev;
      prev = next;
      next = tmp;
    }
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(p.hn + (d * N + n0 + r) * P, prev + r * Pp, sizeof(S) * P);
      if (Cell::kCellState) std::memcpy(p.cn + (d * N + n0 + r) * H, cs + r * Hp, sizeof(S) * H);
    }
  }

  // As forward_chunk(), the backward step of units [j, j + n).
  template <bool kFull, typename T = V>
  static inline void backward_chunk(int64_t j, int64_t n, int64_t ld, const S* gh, const S* dy,
                                    const S* y, const S* saved, const S* h_prev,
                                    const S* c_prev, S* dc, S* dgh, S* dgi, S* dh_prev) {
    const T gv = load_as<T>(gh + j);
    const T g = dy != nullptr ? load_part<kFull, T>(dy + j, n) + gv : gv;
    const T h = y != nullptr ? load_part<kFull, T>(y + j, n) : T{};
    T sv[Cell::kSaved > 0 ? Cell::kSaved : 1];
#pragma GCC unroll 4
    for (int k = 0; k < Cell::kSaved; ++k) sv[k] = load_part<kFull, T>(saved + k * ld + j, n);
    const T c = Cell::kCellState ? load_part<kFull, T>(saved + Cell::kSaved * ld + j, n) : T{};
    const T cp = Cell::kCellState ? load_part<kFull, T>(c_prev + j, n) : T{};
    const T hp = Cell::kPrevState ? load_part<kFull, T>(h_prev + j, n) : T{};
    T dcv = Cell::kCellState ? load_as<T>(dc + j) : T{};
    T dghv[G], dgiv[G], dhp{};
    Cell::template backward<VecMath<S, T>, T>(g, h, sv, hp, cp, c, dcv, dghv, dgiv, dhp);
#pragma GCC unroll 4
    for (int k = 0; k < G; ++k) {
      store_part<kFull, T>(dgh + k * ld + j, dghv[k], n);
      if (Cell::kHiddenBias) store_part<kFull, T>(dgi + k * ld + j, dgiv[k], n);
    }
    if (Cell::kCellState) store_as(dc + j, dcv);
    if (Cell::kPrevState) store_as(dh_prev + j, dhp);
  }

  // The backward step of one row's units [0, units) at a step: gh (dL/dh',
  // scratch; plus dy where dy is not null), the forward's y, saved and the
  // states around the step (saved, dgh, dgi gate blocks ld apart); dgh, dgi
  // out, dc (scratch) updated, the part of dL/dh_prev outside W_hh into
  // dh_prev (scratch, whole vectors).
  static void backward_units(int64_t units, int64_t ld, const S* gh, const S* dy, const S* y,
                             const S* saved, const S* h_prev, const S* c_prev, S* dc, S* dgh,
                             S* dgi, S* dh_prev) {
    // The Elman cell's backward is a product or two a unit, too short a
    // chain to gain (1.04-1.5x as long in fours at hidden 64 and 256).
    constexpr int kVectors = G > 1 ? kStepVectors : 1;
    for_each_chunk<kVectors>(units, [&]<bool kFull, typename T>(int64_t j, int64_t n)
                                        __attribute__((always_inline)) {
      backward_chunk<kFull, T>(j, n, ld, gh, dy, y, saved, h_prev, c_prev, dc, dgh, dgi, dh_prev);
    });
  }

  // The states row n of direction d started step t from: h (P wide) from
  // y or h0, and c (H wide, kCellState cells; else null) from saved or c0.
  static void prev_states(const BackwardParams<S>& p, int64_t d, int64_t n, int64_t t,
                          const S*& h_prev, const S*& c_prev) {
    const int64_t T = p.T, N = p.N, H = p.H, P = p.P, Ws = saved_width<Cell>(H);
    const int64_t q = prev_step(p.lengths, n, t, d, T);
    h_prev = q >= 0 ? p.y + (q * N + n) * p.D * P + d * P : p.h0 + (d * N + n) * P;
    c_prev = !Cell::kCellState ? nullptr
             : q >= 0          ? p.saved + ((d * T + q) * N + n) * Ws + Cell::kSaved * H
                               : p.c0 + (d * N + n) * H;
  }

  // Rows [n0, n1) of direction d, all T steps in the reverse order of the
  // forward. wb: W_hh of this direction packed (G*H x padded(P)); wr: W_hr
  // packed (P x padded(H)), or null without projections; unless `packed`,
  // W_hh and W_hr as stored.
  static void backward(const BackwardParams<S>& p, int64_t d, int64_t n0, int64_t n1,
                       const S* wb, const S* wr, S* scratch, bool packed) {
    const int64_t T = p.T, N = p.N, H = p.H, P = p.P, DP = p.D * p.P, R = n1 - n0;
    const int64_t Hp = padded(H), Pp = padded(P), GH = G * H, Ws = saved_width<Cell>(H);
    const bool proj = wr != nullptr;
    S* dh = scratch;               // (R, Pp) dL/dh of the state after this step
    S* dh_next = dh + R * Pp;      // (R, Pp) of the state before it
    S* dc = dh_next + R * Pp;      // (R, Hp) dL/dc (kCellState)
    S* gp = dc + (Cell::kCellState ? R * Hp : 0);  // (R, Pp) dL/dh' (projections)
    S* dm = gp + (proj ? R * Pp : 0);              // (R, Hp) dL/d(cell output) (projections)
    for (int64_t r = 0; r < R; ++r) {
      if (p.dhn != nullptr)
        std::memcpy(dh + r * Pp, p.dhn + (d * N + n0 + r) * P, sizeof(S) * P);
      else
        std::memset(dh + r * Pp, 0, sizeof(S) * P);
      if (Cell::kCellState) {
        if (p.dcn != nullptr)
          std::memcpy(dc + r * Hp, p.dcn + (d * N + n0 + r) * H, sizeof(S) * H);
        else
          std::memset(dc + r * Hp, 0, sizeof(S) * H);
      }
    }
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = d == 0 ? T - 1 - s : s;
      S* dgh = p.dgh + ((d * T + t) * N + n0) * GH;  // (R, G*H)
      S* dgi = Cell::kHiddenBias ? p.dgi + ((d * T + t) * N + n0) * GH : nullptr;
      if (proj) {
        // dL/dh' of the step, kept for dW_hr, then through W_hr to the cell.
        S* dhr = p.dhr + ((d * T + t) * N + n0) * P;  // (R, P)
        for (int64_t r = 0; r < R; ++r) {
          S* g = gp + r * Pp;
          if (row_active(p.lengths, n0 + r, t)) {
            const S* dy = p.dy + (t * N + n0 + r) * DP + d * P;
            for (int64_t k = 0; k < P; ++k) g[k] = dy[k] + dh[r * Pp + k];
          } else {
            std::memset(g, 0, sizeof(S) * P);
          }
          std::memcpy(dhr + r * P, g, sizeof(S) * P);
        }
        if (packed) gemm(R, Hp, P, gp, Pp, wr, dm, Hp);
        else axpy_gemm(R, P, gp, Pp, wr, H, dm, Hp);
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = n0 + r;
        if (!row_active(p.lengths, n, t)) {
          std::memset(dgh + r * GH, 0, sizeof(S) * GH);
          if (dgi) std::memset(dgi + r * GH, 0, sizeof(S) * GH);
          continue;
        }
        const S *h_prev, *c_prev;
        prev_states(p, d, n, t, h_prev, c_prev);
        const int64_t o = (t * N + n) * DP + d * P;  // row n of step t in y and dy
        backward_units(H, H, proj ? dm + r * Hp : dh + r * Pp, proj ? nullptr : p.dy + o,
                       proj ? nullptr : p.y + o,
                       Ws ? p.saved + ((d * T + t) * N + n) * Ws : nullptr, h_prev, c_prev,
                       dc + r * Hp, dgh + r * GH, dgi ? dgi + r * GH : nullptr, dh_next + r * Pp);
      }
      // dh_prev = dgh W_hh, added to the part outside W_hh where the cell has
      // one; not after the last step where nothing wants the initial state's.
      if (s == T - 1 && !p.state_grad) break;
      if (p.tiles != nullptr) carry_tiles(p, d, R, dgh, GH, dh_next, Pp, Cell::kPrevState);
      else if (packed) gemm(R, Pp, GH, dgh, GH, wb, dh_next, Pp, Cell::kPrevState, s % 2 == 1);
      else axpy_gemm(R, GH, dgh, GH, wb, P, dh_next, Pp, Cell::kPrevState);
      for (int64_t r = 0; r < R; ++r)
        if (!row_active(p.lengths, n0 + r, t))
          std::memcpy(dh_next + r * Pp, dh + r * Pp, sizeof(S) * P);
      S* tmp = dh;
      dh = dh_next;
      dh_next = tmp;
    }
    for (int64_t r = 0; r < R && p.state_grad; ++r) {
      std::memcpy(p.dh0 + (d * N + n0 + r) * P, dh + r * Pp, sizeof(S) * P);
      if (Cell::kCellState) std::memcpy(p.dc0 + (d * N + n0 + r) * H, dc + r * Hp, sizeof(S) * H);
    }
  }
};

// The column-split time loops: where W_hh is too large to sit in one
// core's cache, every thread takes a slice of the units of all rows (and a
// slice of the state's columns for the GEMMs that produce it), so that each
// thread reads its slice of the weights, not all of them, every step; the
// threads meet at a barrier between phases (recurrence_cpu.cpp). Slices
// start on whole vectors, so that no thread's vector stores reach into
// another's columns.
template <typename S, typename Cell>
struct Columns {
  using Kn = Kernels<S, Cell>;
  using V = typename Kn::V;
  static constexpr int G = Cell::kGates;

  // The rows of a step's product that every thread reads and all of them
  // wrote in the step before (the state; the backward's gate gradients),
  // copied into the thread's own scratch before its blocks read them:
  // otherwise the blocks' broadcasts fetch the other core's lines one by one
  // between their multiply-adds. Rows a vector longer than their padded
  // width: copied 8 KB apart as they are, LSTM 512's backward ran 1.01x as
  // long as in place, with the vector 0.97x (one run of three pairs). On one
  // thread, with no other core's lines to fetch, a copy of the backward's
  // rows took 1.02x-1.07x as long. The same sums. Measured here (two threads,
  // input 32, batch 8 unless given, the builds alternating four times;
  // medians, read in place / copied, and the range of the pairs' ratios):
  // backward of 128 steps LSTM 256 4.42 / 4.31 ms (0.86-0.99), batch 16 8.29
  // / 7.82 (0.90-0.98), GRU 256 3.94 / 3.60 (0.83-0.93), LSTM 512 14.5 / 14.0
  // (0.88-0.99), RNN 1024 13.0 / 12.4 (0.91-1.04); no-grad forward, 32-64
  // steps, LSTM 1024 9.76 / 9.17 (0.92-0.99), GRU 1024 7.11 / 6.82
  // (0.93-1.01), RNN 1024 3.95 / 3.67 (0.90-1.01), LSTM 512 3.86 / 3.70
  // (0.92-0.99), batch 16 6.65 / 6.31, GRU 512 batch 24 7.02 / 6.77.
  static constexpr int64_t own_ld(int64_t K) { return Kn::padded(K) + Kn::W; }
  static const S* own_rows(int64_t N, const S* a, int64_t lda, int64_t K, S* rows) {
    for (int64_t n = 0; n < N; ++n) std::memcpy(rows + n * own_ld(K), a + n * lda, sizeof(S) * K);
    return rows;
  }

  // One thread's share of forward step t, units [j0, j0 + nu) of every row.
  // wf: its slice of W_hh^T packed (P x G blocks of padded(nu)); wi: the
  // same of W_ih^T (C x ...); unless `packed`, W_hh and W_ih as stored,
  // whole. bu (G blocks of padded(H)); prev (N, Pp) the state before the
  // step; next, cs and m (rows of Pp, Hp and Hp): it writes their columns
  // [j0, j0 + nu); gates (N, (G + kApart) * padded(nu)) and, where
  // `packed`, rows (N, own_ld(P)) its own scratch.
  static void forward(const ForwardParams<S>& p, int64_t d, int64_t t, int64_t j0, int64_t nu,
                      const S* wf, const S* wi, const S* bu, const S* prev, S* next, S* cs, S* m,
                      S* gates, S* rows, bool packed) {
    using Operand = typename Kn::Operand;
    using Rows = typename Kn::Rows;
    const int64_t N = p.N, H = p.H, P = p.P, DP = p.D * P;
    const int64_t Ws = p.saved != nullptr ? saved_width<Cell>(H) : 0;  // none without a backward
    const int64_t Hp = Kn::padded(H), Pp = Kn::padded(P), nup = Kn::padded(nu);
    const bool proj = m != nullptr;
    const int64_t ldg = (G + Kn::kApart) * nup;
    const bool ahead = !packed && Kn::dot_ahead(G * H * (P + p.C));
    if (p.tiles != nullptr)
      Kn::step_tiles(p, d, N, p.x + t * N * p.C, prev, Pp, gates, ldg);
    else if (packed)
      Kn::step_gemm(N, nup, Operand{p.x + t * N * p.C, p.C, wi, p.C},
                    Operand{own_rows(N, prev, Pp, P, rows), own_ld(P), wf, P}, gates, ldg,
                    (t % 2 == 1) != p.flip);
    else
      Kn::step_dot(N, nup, nu, H, Rows{p.x + t * N * p.C, p.C, wi + j0 * p.C, p.C, ahead},
                   Rows{prev, Pp, wf + j0 * P, P, ahead}, gates, ldg, (t % 2 == 1) != p.flip);
    for (int64_t n = 0; n < N; ++n) {
      S* out = p.y + (t * N + n) * DP + d * P + j0;
      S* saved = Ws ? p.saved + ((d * p.T + t) * N + n) * Ws + j0 : nullptr;
      if (row_active(p.lengths, n, t)) {
        Kn::forward_units(nu, H, bu + j0, Hp, gates + n * ldg, nup,
                          p.b_hh[d] ? p.b_hh[d] + j0 : nullptr, prev + n * Pp + j0,
                          cs + n * Hp + j0, proj ? m + n * Hp + j0 : next + n * Pp + j0,
                          proj ? nullptr : out, saved);
        continue;
      }
      for (int64_t k = 0; Ws && k < Cell::kSaved + (Cell::kCellState ? 1 : 0); ++k)
        std::memset(saved + k * H, 0, sizeof(S) * nu);
      if (proj) {
        std::memset(m + n * Hp + j0, 0, sizeof(S) * nu);
      } else {
        std::memcpy(next + n * Pp + j0, prev + n * Pp + j0, sizeof(S) * nu);
        std::memset(out, 0, sizeof(S) * nu);
      }
    }
  }

  // With projections, after a barrier: columns [k0, k0 + np) of the new
  // state, m W_hr^T, and of the output. wr: W_hr^T's slice packed (H x
  // padded(np)), unless `packed` W_hr as stored, whole; tmp (N,
  // padded(np)) the thread's own.
  static void project(const ForwardParams<S>& p, int64_t d, int64_t t, int64_t k0, int64_t np,
                      const S* wr, const S* m, const S* prev, S* next, S* tmp, bool packed) {
    using Rows = typename Kn::Rows;
    const int64_t N = p.N, P = p.P, DP = p.D * P, Hp = Kn::padded(p.H), Pp = Kn::padded(P);
    const int64_t npp = Kn::padded(np);
    if (packed) Kn::gemm(N, npp, p.H, m, Hp, wr, tmp, npp);
    else Kn::dot_gemm(N, Rows{}, Rows{m, Hp, wr + k0 * p.H, p.H}, np, 1, np, npp, tmp, npp);
    for (int64_t n = 0; n < N; ++n) {
      S* out = p.y + (t * N + n) * DP + d * P + k0;
      if (row_active(p.lengths, n, t)) {
        std::memcpy(next + n * Pp + k0, tmp + n * npp, sizeof(S) * np);
        std::memcpy(out, tmp + n * npp, sizeof(S) * np);
      } else {
        std::memcpy(next + n * Pp + k0, prev + n * Pp + k0, sizeof(S) * np);
        std::memset(out, 0, sizeof(S) * np);
      }
    }
  }

  // One thread's share of backward step t, phase 1: the cell's backward step
  // for units [j0, j0 + nu) of every row (dgh, dgi, dc, and the part of
  // dL/dh_prev outside W_hh into dh_next's columns). dh (N, Pp) dL/dh of the
  // state after the step. With projections (wr: W_hr's slice packed, P x
  // padded(nu)), dL/dh' (gp, N x Pp) first, which thread j0 == 0 also keeps
  // in p.dhr, and gm = gp W_hr (N x padded(nu)), both the thread's own.
  static void backward(const BackwardParams<S>& p, int64_t d, int64_t t, int64_t j0, int64_t nu,
                       const S* wr, const S* dh, S* dh_next, S* dc, S* gp, S* gm) {
    const int64_t T = p.T, N = p.N, H = p.H, P = p.P, DP = p.D * P, GH = G * H;
    const int64_t Ws = saved_width<Cell>(H), Hp = Kn::padded(H), Pp = Kn::padded(P);
    const int64_t nup = Kn::padded(nu);
    const bool proj = wr != nullptr;
    if (proj) {
      for (int64_t n = 0; n < N; ++n) {
        S* g = gp + n * Pp;
        if (row_active(p.lengths, n, t)) {
          const S* dy = p.dy + (t * N + n) * DP + d * P;
          for (int64_t k = 0; k < P; ++k) g[k] = dy[k] + dh[n * Pp + k];
        } else {
          std::memset(g, 0, sizeof(S) * P);
        }
        if (j0 == 0) std::memcpy(p.dhr + ((d * T + t) * N + n) * P, g, sizeof(S) * P);
      }
      Kn::gemm(N, nup, P, gp, Pp, wr, gm, nup);
    }
    for (int64_t n = 0; n < N; ++n) {
      S* dgh = p.dgh + ((d * T + t) * N + n) * GH + j0;
      S* dgi = Cell::kHiddenBias ? p.dgi + ((d * T + t) * N + n) * GH + j0 : nullptr;
      if (!row_active(p.lengths, n, t)) {
        for (int g = 0; g < G; ++g) {
          std::memset(dgh + g * H, 0, sizeof(S) * nu);
          if (dgi) std::memset(dgi + g * H, 0, sizeof(S) * nu);
        }
        continue;
      }
      const S *h_prev, *c_prev;
      Kn::prev_states(p, d, n, t, h_prev, c_prev);
      const int64_t o = (t * N + n) * DP + d * P + j0;
      Kn::backward_units(nu, H, proj ? gm + n * nup : dh + n * Pp + j0,
                         proj ? nullptr : p.dy + o, proj ? nullptr : p.y + o,
                         Ws ? p.saved + ((d * T + t) * N + n) * Ws + j0 : nullptr,
                         h_prev + j0, c_prev ? c_prev + j0 : nullptr, dc + n * Hp + j0, dgh, dgi,
                         dh_next + n * Pp + j0);
    }
  }

  // Phase 2, after a barrier: columns [k0, k0 + np) of dL/dh_prev, dgh W_hh
  // (added to phase 1's part outside W_hh for kPrevState cells) for active
  // rows, dh for the others. wb: W_hh's slice packed (G*H x padded(np));
  // tmp (N, padded(np)) and rows (N, own_ld(G*H)) the thread's own.
  static void carry(const BackwardParams<S>& p, int64_t d, int64_t t, int64_t k0, int64_t np,
                    const S* wb, const S* dh, S* dh_next, S* tmp, S* rows) {
    const int64_t N = p.N, GH = G * p.H, Pp = Kn::padded(p.P), npp = Kn::padded(np);
    if (p.tiles != nullptr) {
      Kn::carry_tiles(p, d, N, p.dgh + ((d * p.T + t) * N) * GH, GH, tmp, npp, false);
    } else {
      const S* dgh = own_rows(N, p.dgh + ((d * p.T + t) * N) * GH, GH, GH, rows);
      Kn::gemm(N, npp, GH, dgh, own_ld(GH), wb, tmp, npp, false, t % 2 == 1);
    }
    for (int64_t n = 0; n < N; ++n) {
      S* dst = dh_next + n * Pp + k0;
      const S* src = tmp + n * npp;
      if (!row_active(p.lengths, n, t)) {
        std::memcpy(dst, dh + n * Pp + k0, sizeof(S) * np);
      } else if (Cell::kPrevState) {
        for (int64_t k = 0; k < np; ++k) dst[k] += src[k];
      } else {
        std::memcpy(dst, src, sizeof(S) * np);
      }
    }
  }
};

template <typename S>
int64_t padded_width(int64_t J) {
  return Kernels<S, ElmanTanh>::padded(J);
}

template <typename S, typename Cell>
void forward_rows(const ForwardParams<S>& p, int64_t d, int64_t n0, int64_t n1, const S* wf,
                  const S* wi, const S* wr, const S* bu, S* scratch, bool packed) {
  Kernels<S, Cell>::forward(p, d, n0, n1, wf, wi, wr, bu, scratch, packed);
}

template <typename S, typename Cell>
void backward_rows(const BackwardParams<S>& p, int64_t d, int64_t n0, int64_t n1, const S* wb,
                   const S* wr, S* scratch, bool packed) {
  Kernels<S, Cell>::backward(p, d, n0, n1, wb, wr, scratch, packed);
}

template <typename S>
void pack(const S* src, int64_t sk, int64_t sc, int64_t K, int64_t J, int64_t blocks, int64_t bs,
          S* out, int64_t c0, int64_t c1) {
  Kernels<S, ElmanTanh>::pack(src, sk, sc, K, J, blocks, bs, out, c0, c1);
}

template <typename S, typename Cell>
int64_t scratch_per_row(int64_t H, int64_t P, bool proj) {
  return Kernels<S, Cell>::scratch_per_row(H, P, proj);
}

template <typename S, typename Cell>
void forward_columns(const ForwardParams<S>& p, int64_t d, int64_t t, int64_t j0, int64_t nu,
                     const S* wf, const S* wi, const S* bu, const S* prev, S* next, S* cs, S* m,
                     S* gates, S* rows, bool packed) {
  Columns<S, Cell>::forward(p, d, t, j0, nu, wf, wi, bu, prev, next, cs, m, gates, rows, packed);
}

template <typename S, typename Cell>
void project_columns(const ForwardParams<S>& p, int64_t d, int64_t t, int64_t k0, int64_t np,
                     const S* wr, const S* m, const S* prev, S* next, S* tmp, bool packed) {
  Columns<S, Cell>::project(p, d, t, k0, np, wr, m, prev, next, tmp, packed);
}

template <typename S, typename Cell>
void backward_columns(const BackwardParams<S>& p, int64_t d, int64_t t, int64_t j0, int64_t nu,
                      const S* wr, const S* dh, S* dh_next, S* dc, S* gp, S* gm) {
  Columns<S, Cell>::backward(p, d, t, j0, nu, wr, dh, dh_next, dc, gp, gm);
}

template <typename S, typename Cell>
void carry_columns(const BackwardParams<S>& p, int64_t d, int64_t t, int64_t k0, int64_t np,
                   const S* wb, const S* dh, S* dh_next, S* tmp, S* rows) {
  Columns<S, Cell>::carry(p, d, t, k0, np, wb, dh, dh_next, tmp, rows);
}

// For each of U units u: dst[u * ldd + (0, n)] = the sum over r in [0, R),
// in order, of g[u * gu + r * gs] times row r (row(r)[0, n)). Four vectors
// of columns at a time in registers for every unit, so that the units
// share each load of a row and their 4 U chains of multiply-adds overlap;
// nothing is stored until the end. Every column goes through the same
// vector code (load_n / store_n at the tail) and every unit through the
// same sums, so a result depends neither on where its column falls nor on
// how many units run together.
template <int U, typename S, typename Row>
inline void rank_sums(S* dst, int64_t ldd, int64_t n, const S* g, int64_t gu, int64_t gs,
                      int64_t R, const Row& row) {
  using K = Kernels<S, ElmanTanh>;
  using V = typename K::V;
  constexpr int64_t W = K::W;
  for (int64_t c = 0; c < n; c += 4 * W) {
    // Each branch has its own accumulators: one array shared by both was
    // kept on the stack, its zeroing and reloads as many as the stores.
    if (c + 4 * W <= n) {
      V a[U][4];
      for (int u = 0; u < U; ++u)
        for (int k = 0; k < 4; ++k) a[u][k] = V{};
      for (int64_t r = 0; r < R; ++r) {
        const S* x = row(r) + c;
        V xv[4];
        for (int k = 0; k < 4; ++k) xv[k] = K::load(x + k * W);
        for (int u = 0; u < U; ++u) {
          const V b = V{} + g[u * gu + r * gs];
          for (int k = 0; k < 4; ++k) a[u][k] += b * xv[k];
        }
      }
      for (int u = 0; u < U; ++u)
        for (int k = 0; k < 4; ++k) K::store(dst + u * ldd + c + k * W, a[u][k]);
      continue;
    }
    // The last block: its four vectors and how many of each one's lanes it
    // holds; a vector's lanes past its width are zero and stay so.
    int64_t w[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t left = n - c - k * W;
      w[k] = left < 0 ? 0 : left < W ? left : W;
    }
    V a[U][4];
    for (int u = 0; u < U; ++u)
      for (int k = 0; k < 4; ++k) a[u][k] = V{};
    for (int64_t r = 0; r < R; ++r) {
      const S* x = row(r) + c;
      for (int k = 0; k < 4; ++k) {
        if (w[k] == 0) continue;
        const V xv = K::load_n(x + k * W, w[k]);
        for (int u = 0; u < U; ++u) a[u][k] += (V{} + g[u * gu + r * gs]) * xv;
      }
    }
    for (int u = 0; u < U; ++u)
      for (int k = 0; k < 4; ++k)
        if (w[k] > 0) K::store_n(dst + u * ldd + c + k * W, a[u][k], w[k]);
  }
}

// The weight gradients of a few rows (WeightGradParams), for units
// [j0, j1): each unit's rows of dW_ih and dW_hh (rank_sums() over the rows,
// one unit or several at a time) and its biases' gradients, so that a
// unit's result does not depend on how the units are split between
// threads. A call of a few rows is all fixed cost: this writes each
// gradient once where four ATen GEMMs and sums would each be dispatched,
// allocate and read the gate gradients.
template <typename S>
void weight_grads(const WeightGradParams<S>& p, int64_t j0, int64_t j1) {
  const int64_t R = p.R, N = p.N, C = p.C, P = p.P, GH = p.GH;
  const S* x = p.x;
  const S* h0 = p.h0;
  const S* y = p.y;
  const auto x_row = [&](int64_t r) { return x + r * C; };
  const auto h_row = [&](int64_t r) { return r < N ? h0 + r * P : y + (r - N) * P; };
  // Four units at a time where the registers hold their 16 accumulators
  // (AVX-512), two with AVX2's 16 registers, so that they share each load
  // of a row. With one row there is nothing to share, only stores, and one
  // unit's row after another, in order (the loop below), wrote faster than
  // four rows side by side: a probe of both writing a 512 x 768 gradient
  // (one thread): 17.4 / 18.8 us, one unit / four, its lines in L3; 25 / 35
  // us (means) with 8 MB read between the passes. Forward+backward at batch
  // 1 (256->512, one thread, processes of both builds alternating, us):
  // LSTMCell 633-728 -> 592-630, GRUCell 443 -> 419-431, RNNCell 184-189 ->
  // 182-184; with AVX2 LSTMCell 753-830 -> 662-744. At two rows four units
  // at a time stayed faster.
  constexpr int kUnits = FASTRNN_VEC_BYTES == 64 ? 4 : 2;
  int64_t j = j0;
  if (R > 1) {
    for (; j + kUnits <= j1; j += kUnits) {
      rank_sums<kUnits>(p.dw_ih + j * C, C, C, p.dgi + j, 1, GH, R, x_row);
      rank_sums<kUnits>(p.dw_hh + j * P, P, P, p.dgh + j, 1, GH, R, h_row);
    }
    for (; j + 2 <= j1; j += 2) {
      rank_sums<2>(p.dw_ih + j * C, C, C, p.dgi + j, 1, GH, R, x_row);
      rank_sums<2>(p.dw_hh + j * P, P, P, p.dgh + j, 1, GH, R, h_row);
    }
  }
  for (; j < j1; ++j) {
    rank_sums<1>(p.dw_ih + j * C, C, C, p.dgi + j, 1, GH, R, x_row);
    rank_sums<1>(p.dw_hh + j * P, P, P, p.dgh + j, 1, GH, R, h_row);
  }
  for (j = j0; j < j1; ++j) {
    if (p.db_ih) {
      S bi = 0, bh = 0;
      for (int64_t r = 0; r < R; ++r) {
        bi += p.dgi[r * GH + j];
        bh += p.dgh[r * GH + j];
      }
      p.db_ih[j] = bi;
      p.db_hh[j] = bh;
    }
  }
}

// Columns [c0, c1) of rows [r0, r1) of the input's gradient dx = dgi W_ih,
// each a rank_sums() over the units in order, four rows at a time (two
// with AVX2's registers): a column's sums do not depend on which others
// are summed with it, so the columns can be split between threads.
template <typename S>
void input_grad(const WeightGradParams<S>& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  const int64_t C = p.C, GH = p.GH, n = c1 - c0;
  const S* w = p.w_ih + c0;
  const auto w_row = [&](int64_t j) { return w + j * C; };
  S* dx = p.dx + c0;
  constexpr int kRows = FASTRNN_VEC_BYTES == 64 ? 4 : 2;
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows)
    rank_sums<kRows>(dx + r * C, C, n, p.dgi + r * GH, GH, 1, GH, w_row);
  for (; r + 2 <= r1; r += 2) rank_sums<2>(dx + r * C, C, n, p.dgi + r * GH, GH, 1, GH, w_row);
  for (; r < r1; ++r) rank_sums<1>(dx + r * C, C, n, p.dgi + r * GH, GH, 1, GH, w_row);
}

// The products of a layer's backward with a narrow side of C columns (the
// input's features, an LSTM of input 32, or the hidden state's) against
// the R rows of the gate gradients g: dW_ih = g^T x and dW_hh = g^T h
// reduce over the rows, dx = g W_ih over the G*H units. As GEMMs of 32
// columns they ran at 40-50% of the multiply-add peak here (MKL, one
// thread; recurrence_cpu.cpp has the measurements). tile_sums() holds U
// rows of the result, NV vectors of columns each, in registers: each step
// of the reduction loads the NV vectors of one row of x (or h, or W_ih) and
// multiplies them by U elements of g, each broadcast by its multiply-add.
// U * NV accumulators fill most of the register file (24 of 32 with
// AVX-512, 12 of 16 below it).
constexpr int kTileAccumulators = FASTRNN_VEC_BYTES == 64 ? 24 : 12;

// For each of U results u: dst[u * ldd + (c, c + n)] = (add ? itself : 0)
// + the sum over k in [k0, k1), in order, of g[u * gu + k * gs] times
// row(k)[c, c + n), n at most NV vectors. kAdjacent: gu is 1 (the results
// are adjacent units of g's rows: dW), so that their elements need no
// index registers, and each k's line of g, gs apart, is fetched kAhead
// steps early: the prefetchers do not follow a stride of pages. A result's
// sums are the same for any U and wherever its columns fall (the lanes
// past n are zero), so that how the results are split between threads
// changes no bit.
template <int U, int NV, bool kAdjacent, bool kFull, typename S, typename Row>
inline void tile_sums(S* dst, int64_t ldd, int64_t c, int64_t n, const S* g, int64_t gu,
                      int64_t gs, int64_t k0, int64_t k1, const Row& row, bool add) {
  using K = Kernels<S, ElmanTanh>;
  using V = typename K::V;
  constexpr int64_t W = K::W;
  constexpr int64_t kAhead = 16;
  const int64_t du = kAdjacent ? 1 : gu;
  int64_t w[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t left = n - v * W;
    w[v] = left < 0 ? 0 : left < W ? left : W;
  }
  V a[U][NV];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < NV; ++v) a[u][v] = V{};
  for (int64_t k = k0; k < k1; ++k) {
    const S* x = row(k) + c;
    const S* gk = g + k * gs;
    if (kAdjacent && k + kAhead < k1) {
      __builtin_prefetch(gk + kAhead * gs, 0, 3);
      __builtin_prefetch(gk + kAhead * gs + (U - 1), 0, 3);
    }
    V xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = kFull ? K::load(x + v * W) : K::load_n(x + v * W, w[v]);
#pragma GCC unroll 24
    for (int u = 0; u < U; ++u) {
      const S b = gk[u * du];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[u][v] += b * xv[v];
    }
  }
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < NV; ++v) {
      if (w[v] == 0) continue;
      S* out = dst + u * ldd + c + v * W;
      K::store_n(out, add ? K::load_n(out, w[v]) + a[u][v] : a[u][v], w[v]);
    }
}

// The largest power of two below U (U > 1).
constexpr int smaller_tile(int U) {
  int p = 1;
  while (p * 2 < U) p *= 2;
  return p;
}

// Results from u on (to u1) in tiles of U, then the rest in tiles of the
// powers of two below U, at most one of each. One result alone has only NV
// chains of multiply-adds, each waiting on its last: with AVX-512, dW_hh
// of an LSTM of hidden 16 (64 results of 16 columns, tiles of 24) left 16
// results to single tiles, which took longer than the 48 before them.
template <int U, int NV, typename S, typename Row>
inline void narrow_tiles(S* dst, int64_t ldd, int64_t c, int64_t n, const S* g, int64_t gu,
                         int64_t gs, int64_t u, int64_t u1, int64_t k0, int64_t k1,
                         const Row& row, bool add) {
  constexpr int64_t W = Kernels<S, ElmanTanh>::W;
  const bool full = n == NV * W;
  for (; u + U <= u1; u += U) {
    S* d = dst + u * ldd;
    const S* gu0 = g + u * gu;
    if (gu == 1 && full) tile_sums<U, NV, true, true>(d, ldd, c, n, gu0, gu, gs, k0, k1, row, add);
    else if (gu == 1) tile_sums<U, NV, true, false>(d, ldd, c, n, gu0, gu, gs, k0, k1, row, add);
    else if (full) tile_sums<U, NV, false, true>(d, ldd, c, n, gu0, gu, gs, k0, k1, row, add);
    else tile_sums<U, NV, false, false>(d, ldd, c, n, gu0, gu, gs, k0, k1, row, add);
  }
  if constexpr (U > 1)
    narrow_tiles<smaller_tile(U), NV>(dst, ldd, c, n, g, gu, gs, u, u1, k0, k1, row, add);
}

// Results [u0, u1) (dst's rows, ldd apart) over all C columns, NV vectors at
// a time, in tiles of kTileAccumulators / NV results and smaller ones for
// the last few (narrow_tiles()).
template <int NV, typename S, typename Row>
inline void narrow_sums(S* dst, int64_t ldd, int64_t C, const S* g, int64_t gu, int64_t gs,
                        int64_t u0, int64_t u1, int64_t k0, int64_t k1, const Row& row,
                        bool add) {
  constexpr int U = kTileAccumulators / NV;
  constexpr int64_t W = Kernels<S, ElmanTanh>::W;
  for (int64_t c = 0; c < C; c += NV * W) {
    const int64_t n = C - c < NV * W ? C - c : NV * W;
    narrow_tiles<U, NV>(dst, ldd, c, n, g, gu, gs, u0, u1, k0, k1, row, add);
  }
}

// narrow_sums() with NV = the vectors C takes, at most four.
template <typename S, typename Row>
inline void narrow_sums_any(S* dst, int64_t ldd, int64_t C, const S* g, int64_t gu, int64_t gs,
                            int64_t u0, int64_t u1, int64_t k0, int64_t k1, const Row& row,
                            bool add) {
  constexpr int64_t W = Kernels<S, ElmanTanh>::W;
  switch (C <= W ? 1 : C <= 2 * W ? 2 : C <= 3 * W ? 3 : 4) {
    case 1: return narrow_sums<1>(dst, ldd, C, g, gu, gs, u0, u1, k0, k1, row, add);
    case 2: return narrow_sums<2>(dst, ldd, C, g, gu, gs, u0, u1, k0, k1, row, add);
    case 3: return narrow_sums<3>(dst, ldd, C, g, gu, gs, u0, u1, k0, k1, row, add);
    default: return narrow_sums<4>(dst, ldd, C, g, gu, gs, u0, u1, k0, k1, row, add);
  }
}

// Units [j0, j1) of dW (GH, C) = g^T z, g (R, GH) and z the rows of a (Ra
// of them, lda apart) then those of b (ldb apart): dW_ih with z = x, dW_hh
// with z = the states before each step (h0's rows, then the output's). The
// rows are taken in runs of kRun, each run through every tile of units
// before the next, its sums added to the runs' before (kRun terms a chain
// in float32, not R: an error of about that of a GEMM blocked alike): a
// tile reads a short piece of each of g's rows, a page or more apart, and
// each run's first tile fetches them.
// Measured here (float32, one thread, G*H 1024 and 4096, C 32): runs of
// 64-256 KB of g 21-42 GFMA/s, of 256-512 rows 41-52, the whole of g 31.
template <typename S>
void narrow_weight_grad(const S* g, int64_t R, int64_t GH, const S* a, int64_t lda, int64_t Ra,
                        const S* b, int64_t ldb, int64_t C, S* dw, int64_t j0, int64_t j1) {
  constexpr int64_t kRun = 512;
  const auto z_row = [&](int64_t r) { return r < Ra ? a + r * lda : b + (r - Ra) * ldb; };
  if (R == 0) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t c = 0; c < C; ++c) dw[j * C + c] = S(0);
    return;
  }
  for (int64_t r0 = 0; r0 < R; r0 += kRun) {
    const int64_t r1 = r0 + kRun < R ? r0 + kRun : R;
    narrow_sums_any(dw, C, C, g, 1, GH, j0, j1, r0, r1, z_row, r0 > 0);
  }
}

// Rows [r0, r1) of dx (R, C) = g W_ih, g (R, GH), W_ih (GH, C); added to
// dx's values where `add` (the second direction's term). The units in runs
// of kRun, each run's sums added to the runs' before, as above.
template <typename S>
void narrow_input_grad(const S* g, int64_t GH, const S* w, int64_t C, S* dx, bool add,
                       int64_t r0, int64_t r1) {
  constexpr int64_t kRun = 512;
  const auto w_row = [&](int64_t j) { return w + j * C; };
  if (GH == 0 && !add) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < C; ++c) dx[r * C + c] = S(0);
  }
  // kGroup rows (whole tiles for every NV) through all runs, then the next:
  // each of g's rows is read in order.
  constexpr int64_t kGroup = 24;
  for (int64_t q0 = r0; q0 < r1; q0 += kGroup) {
    const int64_t q1 = q0 + kGroup < r1 ? q0 + kGroup : r1;
    for (int64_t k0 = 0; k0 < GH; k0 += kRun) {
      const int64_t k1 = k0 + kRun < GH ? k0 + kRun : GH;
      narrow_sums_any(dx, C, C, g, GH, 1, q0, q1, k0, k1, w_row, add || k0 > 0);
    }
  }
}

// The multiply-add probe behind the benchmark's roofline: `rounds` times
// twelve independent chains of float32 vector multiply-adds (a = a * b + c,
// one fused instruction each with this instruction set's FMA), enough chains
// to cover the FMA latency on both ports. Returns the lane multiply-adds
// done; the chains' sum goes to `sink` so that none is optimised away. (Not
// inline: each instruction set's file includes this header once.)
int64_t fma_probe_entry(int64_t rounds, float* sink) {
  typedef VecOf<float>::type V;
  constexpr int kChains = 12;
  constexpr int64_t kLanes = sizeof(V) / sizeof(float);
  V a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = V{} + (1.0f + 1e-3f * static_cast<float>(i));
  const V b = V{} + 0.999999f, c = V{} + 1e-7f;
  for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = a[i] * b + c;
  }
  V total = V{};
  for (int i = 0; i < kChains; ++i) total += a[i];
  float out = 0.f;
  for (int64_t k = 0; k < kLanes; ++k) out += total[k];
  *sink = out;
  return rounds * kChains * kLanes;
}

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn

// Explicit instantiations of the entry points for every dtype and cell, at
// the end of each instruction set's file.
#define FASTRNN_CPU_INSTANTIATE_CELL(S, Cell)                                                  \
  template void forward_rows<S, Cell>(const ForwardParams<S>&, int64_t, int64_t, int64_t,      \
                                      const S*, const S*, const S*, const S*, S*, bool);       \
  template void backward_rows<S, Cell>(const BackwardParams<S>&, int64_t, int64_t, int64_t,    \
                                       const S*, const S*, S*, bool);                          \
  template int64_t scratch_per_row<S, Cell>(int64_t, int64_t, bool);                          \
  template void forward_columns<S, Cell>(const ForwardParams<S>&, int64_t, int64_t, int64_t,   \
                                         int64_t, const S*, const S*, const S*, const S*, S*,  \
                                         S*, S*, S*, S*, bool);                                 \
  template void project_columns<S, Cell>(const ForwardParams<S>&, int64_t, int64_t, int64_t,   \
                                         int64_t, const S*, const S*, const S*, S*, S*, bool);  \
  template void backward_columns<S, Cell>(const BackwardParams<S>&, int64_t, int64_t, int64_t, \
                                          int64_t, const S*, const S*, S*, S*, S*, S*);         \
  template void carry_columns<S, Cell>(const BackwardParams<S>&, int64_t, int64_t, int64_t,    \
                                       int64_t, const S*, const S*, S*, S*, S*);
#define FASTRNN_CPU_INSTANTIATE(S)                                                             \
  template int64_t padded_width<S>(int64_t);                                                   \
  template void pack<S>(const S*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, S*,    \
                        int64_t, int64_t);                                                     \
  template void weight_grads<S>(const WeightGradParams<S>&, int64_t, int64_t);                 \
  template void input_grad<S>(const WeightGradParams<S>&, int64_t, int64_t, int64_t, int64_t); \
  template void narrow_weight_grad<S>(const S*, int64_t, int64_t, const S*, int64_t, int64_t,  \
                                      const S*, int64_t, int64_t, S*, int64_t, int64_t);       \
  template void narrow_input_grad<S>(const S*, int64_t, const S*, int64_t, S*, bool, int64_t,  \
                                     int64_t);                                                 \
  FASTRNN_CPU_INSTANTIATE_CELL(S, ElmanTanh)                                                   \
  FASTRNN_CPU_INSTANTIATE_CELL(S, ElmanRelu)                                                   \
  FASTRNN_CPU_INSTANTIATE_CELL(S, Lstm)                                                        \
  FASTRNN_CPU_INSTANTIATE_CELL(S, Gru)
