// The recurrent cells, each defined once: how many gates it has, what a
// forward step keeps for the backward, and its pointwise forward and
// backward step for one hidden unit. Every time loop takes a cell as a
// template parameter: the CPU kernels (with vectors of units), the CUDA
// bodies and their emulator (one unit at a time), and the differentiable
// ATen forward of double backward and of function transforms (with tensors
// of units). PyTorch's gate orders and formulas, so that weights move
// between torch.nn and fastrnn unchanged:
//
//   Elman  h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)          act = tanh or relu
//   LSTM   i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of the four blocks of
//            x W_ih^T + b_ih + h W_hh^T + b_hh
//          c' = f c + i g,  h' = o tanh(c')   (then h' W_hr^T with projections)
//   GRU    r, z = sigmoid of the first two blocks of x W_ih^T + b_ih + h W_hh^T + b_hh
//          n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)),  h' = n + z (h - n)
//
// The arguments of a step, for one unit j (or a vector or tensor of units),
// with G = kGates:
//   u[G]     the input term of each gate: x W_ih^T + b_ih, plus b_hh unless
//            kHiddenBias
//   hw[G]    h_prev W_hh^T of each gate
//   bh[G]    b_hh of each gate (kHiddenBias cells only; zero without biases)
//   h_prev   the unit's state before the step (kPrevState cells only)
//   c        the cell state: c_prev in, c' out (kCellState cells only)
//   h        out: the unit's new state (before the projection, if any)
//   saved    out: kSaved values the backward step reads
//
// and of its backward:
//   g        dL/dh' (through the output and the later steps)
//   h        h' as the forward computed it
//   saved    what the forward kept
//   h_prev, c_prev, c   the states around the step, as in the forward
//   dc       dL/dc' in, dL/dc_prev out (kCellState cells only)
//   dgh[G]   out: dL/d(hw + bh), which W_hh, b_hh and the carry see
//   dgi[G]   out: dL/du, which W_ih, b_ih and the input see; written only by
//            kHiddenBias cells, for the others it is dgh
//   dh_prev  out: dL/dh_prev outside W_hh (kPrevState cells only)
//
// The last kInputApart gates use their input term apart from the hidden
// one (GRU's n: tanh(u + r (hw + bh))); the others only add them (u + hw).
//
// A cell with kProjections may multiply its output by W_hr (LSTM's
// proj_size); output(saved, c) recovers the output before W_hr from what
// the step kept, for W_hr's gradient.
//
// The math policy M gives the cell its functions for the value type V:
// M::tanh, M::sigmoid, M::relu (x < 0 ? 0 : x, NaN kept, as torch.relu),
// M::relu_backward(g, h) (h <= 0 ? 0 : g, torch's threshold_backward),
// M::mul_add(a, b, c) (a b + c, rounded once where M fuses products: a sum
// of two products names the one it fuses, so that no compiler's choice
// between them decides the bits), and M::S, the scalar type of literals.
#pragma once

#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FASTRNN_HD __host__ __device__ __forceinline__
#else
#define FASTRNN_HD inline __attribute__((always_inline))
#endif

namespace fastrnn {

// The cells by number. The ops take a cell by its name (kName), which
// cell_kind() in rnn_args.h reads.
enum class CellKind : int { rnn_tanh = 0, rnn_relu = 1, lstm = 2, gru = 3 };

template <bool kRelu>
struct Elman {
  static constexpr CellKind kind = kRelu ? CellKind::rnn_relu : CellKind::rnn_tanh;
  static constexpr const char* kName = kRelu ? "rnn_relu" : "rnn_tanh";
  static constexpr int kGates = 1;
  static constexpr int kSaved = 0;
  static constexpr bool kCellState = false;
  static constexpr bool kHiddenBias = false;
  static constexpr bool kPrevState = false;
  static constexpr bool kProjections = false;
  static constexpr int kInputApart = 0;

  template <class M, class V>
  static FASTRNN_HD void forward(const V* u, const V* hw, const V* /*bh*/, const V& /*h_prev*/,
                                 V& /*c*/, V& h, V* /*saved*/) {
    h = kRelu ? M::relu(u[0] + hw[0]) : M::tanh(u[0] + hw[0]);
  }

  template <class M, class V>
  static FASTRNN_HD void backward(const V& g, const V& h, const V* /*saved*/, const V& /*h_prev*/,
                                  const V& /*c_prev*/, const V& /*c*/, V& /*dc*/, V* dgh,
                                  V* /*dgi*/, V& /*dh_prev*/) {
    using S = typename M::S;
    dgh[0] = kRelu ? M::relu_backward(g, h) : g * (S(1) - h * h);
  }
};

using ElmanTanh = Elman<false>;
using ElmanRelu = Elman<true>;

struct Lstm {
  static constexpr CellKind kind = CellKind::lstm;
  static constexpr const char* kName = "lstm";
  static constexpr int kGates = 4;
  static constexpr int kSaved = 4;  // i, f, g, o after their activations
  static constexpr bool kCellState = true;
  static constexpr bool kHiddenBias = false;
  static constexpr bool kPrevState = false;
  static constexpr bool kProjections = true;
  static constexpr int kInputApart = 0;

  template <class M, class V>
  static FASTRNN_HD void forward(const V* u, const V* hw, const V* /*bh*/, const V& /*h_prev*/,
                                 V& c, V& h, V* saved) {
    const V i = M::sigmoid(u[0] + hw[0]);
    const V f = M::sigmoid(u[1] + hw[1]);
    const V g = M::tanh(u[2] + hw[2]);
    const V o = M::sigmoid(u[3] + hw[3]);
    c = M::mul_add(f, c, i * g);
    h = o * M::tanh(c);
    saved[0] = i, saved[1] = f, saved[2] = g, saved[3] = o;
  }

  template <class M, class V>
  static FASTRNN_HD void backward(const V& g_h, const V& /*h*/, const V* saved, const V& /*h_prev*/,
                                  const V& c_prev, const V& c, V& dc, V* dgh, V* /*dgi*/,
                                  V& /*dh_prev*/) {
    using S = typename M::S;
    const V& i = saved[0];
    const V& f = saved[1];
    const V& g = saved[2];
    const V& o = saved[3];
    const V tc = M::tanh(c);
    const V dct = dc + g_h * o * (S(1) - tc * tc);
    dgh[0] = dct * g * i * (S(1) - i);
    dgh[1] = dct * c_prev * f * (S(1) - f);
    dgh[2] = dct * i * (S(1) - g * g);
    dgh[3] = g_h * tc * o * (S(1) - o);
    dc = dct * f;
  }

  template <class M, class V>
  static FASTRNN_HD V output(const V* saved, const V& c) {
    return saved[3] * M::tanh(c);
  }
};

struct Gru {
  static constexpr CellKind kind = CellKind::gru;
  static constexpr const char* kName = "gru";
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;  // r, z, n and h_prev W_hn^T + b_hn
  static constexpr bool kCellState = false;
  static constexpr bool kHiddenBias = true;
  static constexpr bool kPrevState = true;
  static constexpr bool kProjections = false;
  static constexpr int kInputApart = 1;

  template <class M, class V>
  static FASTRNN_HD void forward(const V* u, const V* hw, const V* bh, const V& h_prev, V& /*c*/,
                                 V& h, V* saved) {
    const V r = M::sigmoid(u[0] + (hw[0] + bh[0]));
    const V z = M::sigmoid(u[1] + (hw[1] + bh[1]));
    const V hn = hw[2] + bh[2];
    const V n = M::tanh(u[2] + hn * r);
    h = n + z * (h_prev - n);
    saved[0] = r, saved[1] = z, saved[2] = n, saved[3] = hn;
  }

  template <class M, class V>
  static FASTRNN_HD void backward(const V& g_h, const V& /*h*/, const V* saved, const V& h_prev,
                                  const V& /*c_prev*/, const V& /*c*/, V& /*dc*/, V* dgh, V* dgi,
                                  V& dh_prev) {
    using S = typename M::S;
    const V& r = saved[0];
    const V& z = saved[1];
    const V& n = saved[2];
    const V& hn = saved[3];
    const V dn = g_h * (S(1) - z) * (S(1) - n * n);
    const V dr = dn * hn * r * (S(1) - r);
    const V dz = g_h * (h_prev - n) * z * (S(1) - z);
    dgi[0] = dgh[0] = dr;
    dgi[1] = dgh[1] = dz;
    dgi[2] = dn;
    dgh[2] = dn * r;
    dh_prev = g_h * z;
  }
};

// Calls fn(Cell{}) with the cell of `kind`; a kind with no cell (a value
// cast from a bad integer) is an error, never some cell's arithmetic.
template <typename Fn>
decltype(auto) with_cell(CellKind kind, const Fn& fn) {
  switch (kind) {
    case CellKind::rnn_tanh: return fn(ElmanTanh{});
    case CellKind::rnn_relu: return fn(ElmanRelu{});
    case CellKind::lstm: return fn(Lstm{});
    case CellKind::gru: return fn(Gru{});
  }
  throw std::invalid_argument("fastrnn: unknown cell kind " + std::to_string(static_cast<int>(kind)));
}

}  // namespace fastrnn
