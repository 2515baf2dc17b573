// The CPU time loops, written once and compiled once per instruction set.
//
// Each recurrence_cpu_<isa>.cpp includes this file after a `#pragma GCC
// target`, having defined
//   FASTRNN_CPU_ISA    the namespace these kernels land in (avx512, avx2, base)
//   FASTRNN_VEC_BYTES  the width of one vector register in bytes
// and, in that namespace, tanh_inplace(double*, int64_t). Nothing here may use a template from the
// standard library: an out-of-line copy compiled for AVX-512 could be picked
// by the linker for every caller.
//
// One step of a batch block is a small GEMM (rows x H times H x H) followed by
// the activation; the block of rows is carried through all T steps, so a
// thread touches only its own rows and no step needs a barrier. The caller
// packs the weights once (pack) and gives each call a scratch of
// 2 * (n1 - n0) * padded_width(H) elements: nothing here allocates.

#include <cstdint>
#include <cstring>

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

// tanh for float: a 13/6-degree rational approximation, accurate to a few
// ulp, evaluated in vector registers (the C library's tanhf costs about 20
// times more per element here). The input is clamped to [-c, c], where the
// approximation reaches exactly +-1, which also maps +-inf to +-1; NaN fails
// every comparison and so passes through the clamp and the quotient as NaN.
// Below |x| = 4e-4, tanh(x) rounds to x itself.
template <typename V>
inline V tanh_rational(V x) {
  const V c = V{} + 7.99881172180175781f;
  V a = x > c ? c : x;
  a = a < -c ? -c : a;
  const V x2 = a * a;
  V p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * a;
  V q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const V ax = x < 0 ? -x : x;
  return ax < 4e-4f ? x : p / q;
}

inline void tanh_inplace(float* x, int64_t n);  // defined below, from tanh_rational

template <typename S>
struct Kernels {
  using V = typename VecOf<S>::type;
  static constexpr int64_t W = FASTRNN_VEC_BYTES / sizeof(S);  // lanes per vector
  // Rows per register block: RB x 2 accumulators, plus two panel vectors and
  // a broadcast, fill but do not spill the register file (32 with AVX-512, 16
  // below it).
  static constexpr int RB = FASTRNN_VEC_BYTES == 64 ? 8 : 4;

  static inline V load(const S* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(S* p, V v) { std::memcpy(p, &v, sizeof(V)); }

  // Columns padded to whole vectors: the width of every scratch row.
  static int64_t padded(int64_t J) { return (J + W - 1) / W * W; }

  // Panel widths of a packed matrix: 2W while they fit, then W.
  static inline int64_t panel_width(int64_t j, int64_t Jp) { return j + 2 * W <= Jp ? 2 * W : W; }

  // Packs b (K x J, row-major) into column panels, each K x width and
  // contiguous, zero-padded to padded(J) columns: out holds K * padded(J).
  // A step then reads its weights in order instead of at a stride of J,
  // which maps a whole column of a large b onto a few cache sets.
  static void pack(const S* b, int64_t K, int64_t J, S* out) {
    const int64_t Jp = padded(J);
    for (int64_t j0 = 0; j0 < Jp; j0 += panel_width(j0, Jp)) {
      const int64_t w = panel_width(j0, Jp);
      S* panel = out + j0 * K;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < w; ++c) panel[k * w + c] = j0 + c < J ? b[k * J + j0 + c] : S(0);
    }
  }

  // What a GEMM does with its result besides storing it in c: nothing
  // (u == nullptr), or the forward step's epilogue, c = act(c + u), also
  // written to out. Pointers at the block's first row and column.
  struct Epilogue {
    const S* u = nullptr;
    int64_t ldu = 0;
    S* out = nullptr;
    int64_t ldo = 0;
    bool relu = false;
    Epilogue shifted(int64_t r, int64_t j) const {
      return u ? Epilogue{u + r * ldu + j, ldu, out + r * ldo + j, ldo, relu} : *this;
    }
  };

  static inline V act(V x, bool relu) {
    if (relu) return x < S(0) ? V{} : x;  // keeps NaN, as torch.relu does
    return tanh_rational(x);
  }

  // c (R x JV*W) = a (R x K) panel (K x JV*W); the accumulators stay in
  // registers. FUSED (float only) applies the epilogue to them before the
  // store; the caller guarantees its JV*W columns all lie inside u and out.
  template <int R, int JV, bool FUSED>
  static inline void block(int64_t K, const S* a, int64_t lda, const S* panel, S* c,
                           int64_t ldc, const Epilogue& e) {
    V acc[R][JV];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < JV; ++v) acc[r][v] = V{};
    for (int64_t k = 0; k < K; ++k) {
      V bv[JV];
#pragma GCC unroll 4
      for (int v = 0; v < JV; ++v) bv[v] = load(panel + (k * JV + v) * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const S ar = a[r * lda + k];
#pragma GCC unroll 4
        for (int v = 0; v < JV; ++v) acc[r][v] += ar * bv[v];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < JV; ++v) {
        V x = acc[r][v];
        if constexpr (FUSED) {
          x = act(x + load(e.u + r * e.ldu + v * W), e.relu);
          store(e.out + r * e.ldo + v * W, x);
        }
        store(c + r * ldc + v * W, x);
      }
    }
  }

  // Rows in blocks of RB, then halves of it: a block of one row has too few
  // independent accumulators to hide the multiply-add latency, so the
  // remainder of a few rows is worth keeping together.
  template <int JV, bool FUSED>
  static inline void rows(int64_t R, int64_t K, const S* a, int64_t lda, const S* panel, S* c,
                          int64_t ldc, const Epilogue& e) {
    int64_t r = 0;
    for (; r + RB <= R; r += RB)
      block<RB, JV, FUSED>(K, a + r * lda, lda, panel, c + r * ldc, ldc, e.shifted(r, 0));
    if (RB > 4 && r + 4 <= R) {
      block<4, JV, FUSED>(K, a + r * lda, lda, panel, c + r * ldc, ldc, e.shifted(r, 0));
      r += 4;
    }
    if (r + 2 <= R) {
      block<2, JV, FUSED>(K, a + r * lda, lda, panel, c + r * ldc, ldc, e.shifted(r, 0));
      r += 2;
    }
    if (r < R) block<1, JV, FUSED>(K, a + r * lda, lda, panel, c + r * ldc, ldc, e.shifted(r, 0));
  }

  // The epilogue element by element, on columns [0, n) of R rows of c.
  static void epilogue_columns(int64_t R, int64_t n, S* c, int64_t ldc, const Epilogue& e) {
    for (int64_t r = 0; r < R; ++r) {
      S* h = c + r * ldc;
      const S* u = e.u + r * e.ldu;
      for (int64_t j = 0; j < n; ++j) h[j] += u[j];
      activate(h, n, e.relu);
      std::memcpy(e.out + r * e.ldo, h, sizeof(S) * n);
    }
  }

  // c (R x padded(J)) = a (R x K) b (K x J), b packed by pack(), then the
  // epilogue on the J real columns. The sum over k runs in the same order for
  // every element, and the epilogue is the same arithmetic in registers or
  // element by element, so no result depends on where its row or column falls.
  static void gemm(int64_t R, int64_t J, int64_t K, const S* a, int64_t lda, const S* packed,
                   S* c, int64_t ldc, const Epilogue& e = Epilogue{}) {
    const int64_t Jp = padded(J);
    for (int64_t j0 = 0; j0 < Jp; j0 += panel_width(j0, Jp)) {
      const int64_t w = panel_width(j0, Jp);
      const bool fused = e.u != nullptr && sizeof(S) == 4 && j0 + w <= J;
      const S* panel = packed + j0 * K;
      const Epilogue ej = e.shifted(0, j0);
      if (w == 2 * W) {
        if (fused) rows<2, true>(R, K, a, lda, panel, c + j0, ldc, ej);
        else rows<2, false>(R, K, a, lda, panel, c + j0, ldc, ej);
      } else {
        if (fused) rows<1, true>(R, K, a, lda, panel, c + j0, ldc, ej);
        else rows<1, false>(R, K, a, lda, panel, c + j0, ldc, ej);
      }
      if (e.u != nullptr && !fused && j0 < J)
        epilogue_columns(R, (j0 + w <= J ? j0 + w : J) - j0, c + j0, ldc, ej);
    }
  }

  static void activate(S* x, int64_t n, bool relu) {
    if (relu) {
      // `x < 0 ? 0 : x` keeps NaN, as torch.relu does.
      for (int64_t i = 0; i < n; ++i) x[i] = x[i] < S(0) ? S(0) : x[i];
    } else {
      tanh_inplace(x, n);
    }
  }

  static inline bool active(const int64_t* lengths, int64_t n, int64_t t) {
    return lengths == nullptr || t < lengths[n];
  }

  // Rows [n0, n1) of direction d, all T steps. w_packed: W_hh^T of this
  // direction, packed. scratch: 2 * (n1 - n0) * padded(H).
  static void forward(const ForwardParams<S>& p, int64_t d, int64_t n0, int64_t n1,
                      const S* w_packed, S* scratch) {
    const int64_t T = p.T, N = p.N, H = p.H, DH = p.D * p.H, R = n1 - n0, Hp = padded(H);
    S* prev = scratch;          // (R, Hp) state before the step
    S* next = scratch + R * Hp;  // (R, Hp) state after it
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(prev + r * Hp, p.h0 + (d * N + n0 + r) * H, sizeof(S) * H);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = d == 0 ? s : T - 1 - s;
      const S* u = p.u + ((d * T + t) * N + n0) * H;  // (R, H)
      S* out = p.y + (t * N + n0) * DH + d * H;       // (R, H), row stride D*H
      if (p.lengths == nullptr) {
        gemm(R, H, H, prev, Hp, w_packed, next, Hp, Epilogue{u, H, out, DH, p.relu});
      } else {
        gemm(R, H, H, prev, Hp, w_packed, next, Hp);
        for (int64_t r = 0; r < R; ++r) {
          S* h = next + r * Hp;
          if (active(p.lengths, n0 + r, t)) {
            epilogue_columns(1, H, h, Hp, Epilogue{u + r * H, H, out + r * DH, DH, p.relu});
          } else {
            std::memcpy(h, prev + r * Hp, sizeof(S) * H);
            std::memset(out + r * DH, 0, sizeof(S) * H);
          }
        }
      }
      S* tmp = prev;
      prev = next;
      next = tmp;
    }
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(p.hn + (d * N + n0 + r) * H, prev + r * Hp, sizeof(S) * H);
  }

  // Rows [n0, n1) of direction d, all T steps in the reverse order of the
  // forward. w_packed: W_hh of this direction, packed. scratch: as forward.
  static void backward(const BackwardParams<S>& p, int64_t d, int64_t n0, int64_t n1,
                       const S* w_packed, S* scratch) {
    const int64_t T = p.T, N = p.N, H = p.H, DH = p.D * p.H, R = n1 - n0, Hp = padded(H);
    S* dh = scratch;               // (R, Hp) gradient of the state after this step
    S* dh_next = scratch + R * Hp;  // (R, Hp) gradient of the state before it
    for (int64_t r = 0; r < R; ++r) {
      if (p.dhn != nullptr)
        std::memcpy(dh + r * Hp, p.dhn + (d * N + n0 + r) * H, sizeof(S) * H);
      else
        std::memset(dh + r * Hp, 0, sizeof(S) * H);
    }
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = d == 0 ? T - 1 - s : s;
      S* dz = p.dz + ((d * T + t) * N + n0) * H;  // (R, H)
      for (int64_t r = 0; r < R; ++r) {
        S* z = dz + r * H;
        if (!active(p.lengths, n0 + r, t)) {
          std::memset(z, 0, sizeof(S) * H);
          continue;
        }
        const S* h = p.y + (t * N + n0 + r) * DH + d * H;
        const S* g = p.dy + (t * N + n0 + r) * DH + d * H;
        const S* c = dh + r * Hp;
        if (p.relu) {
          // torch's threshold_backward: zero where the output is <= 0.
          for (int64_t j = 0; j < H; ++j) z[j] = h[j] <= S(0) ? S(0) : g[j] + c[j];
        } else {
          for (int64_t j = 0; j < H; ++j) z[j] = (g[j] + c[j]) * (S(1) - h[j] * h[j]);
        }
      }
      gemm(R, H, H, dz, H, w_packed, dh_next, Hp);
      for (int64_t r = 0; r < R; ++r)
        if (!active(p.lengths, n0 + r, t))
          std::memcpy(dh_next + r * Hp, dh + r * Hp, sizeof(S) * H);
      S* tmp = dh;
      dh = dh_next;
      dh_next = tmp;
    }
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(p.dh0 + (d * N + n0 + r) * H, dh + r * Hp, sizeof(S) * H);
  }
};

// The float tanh of every instruction set; the tail runs through the same
// vector code as the body, so an element's value does not depend on where it
// falls.
inline void tanh_inplace(float* x, int64_t n) {
  using K = Kernels<float>;
  int64_t i = 0;
  for (; i + K::W <= n; i += K::W) K::store(x + i, tanh_rational(K::load(x + i)));
  if (i < n) {
    float buf[K::W] = {};
    std::memcpy(buf, x + i, sizeof(float) * (n - i));
    K::store(buf, tanh_rational(K::load(buf)));
    std::memcpy(x + i, buf, sizeof(float) * (n - i));
  }
}

int64_t padded_width(int64_t J, bool is_double) {
  return is_double ? Kernels<double>::padded(J) : Kernels<float>::padded(J);
}
void pack(const float* b, int64_t K, int64_t J, float* out) { Kernels<float>::pack(b, K, J, out); }
void pack(const double* b, int64_t K, int64_t J, double* out) { Kernels<double>::pack(b, K, J, out); }
void forward_rows(const ForwardParams<float>& p, int64_t d, int64_t n0, int64_t n1,
                  const float* w_packed, float* scratch) {
  Kernels<float>::forward(p, d, n0, n1, w_packed, scratch);
}
void forward_rows(const ForwardParams<double>& p, int64_t d, int64_t n0, int64_t n1,
                  const double* w_packed, double* scratch) {
  Kernels<double>::forward(p, d, n0, n1, w_packed, scratch);
}
void backward_rows(const BackwardParams<float>& p, int64_t d, int64_t n0, int64_t n1,
                   const float* w_packed, float* scratch) {
  Kernels<float>::backward(p, d, n0, n1, w_packed, scratch);
}
void backward_rows(const BackwardParams<double>& p, int64_t d, int64_t n0, int64_t n1,
                   const double* w_packed, double* scratch) {
  Kernels<double>::backward(p, d, n0, n1, w_packed, scratch);
}

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn
