// See rnn_stack.h.
#include "rnn_stack.h"

#include <ATen/ATen.h>

#include <cstring>

#include "recurrence.h"

namespace fastrnn {
namespace {

using at::Tensor;
using std::optional;

optional<Tensor> contiguous(const optional<Tensor>& t) {
  return t ? optional<Tensor>(t->contiguous()) : std::nullopt;
}

// t.view(sizes) of a contiguous t; on the CPU without the dispatcher
// (shaped()), which a small call's backward would otherwise pass through a
// dozen times.
Tensor view_of(const Tensor& t, at::IntArrayRef sizes) {
  return t.is_cpu() && t.is_contiguous() && c10::multiply_integers(sizes) == t.numel()
             ? shaped(t, sizes)
             : t.view(sizes);
}

// t.zero_() of a buffer(); on the CPU without the dispatcher.
void zero_buffer(const Tensor& t) {
  if (t.is_cpu() && t.is_contiguous()) {
    // An empty tensor's data may be null, which memset must not be given.
    if (t.nbytes() > 0) std::memset(t.data_ptr(), 0, t.nbytes());
  } else {
    t.zero_();
  }
}

// t.narrow(dim, start, length), or t itself where that is all of it: a
// dispatched op saved, which counts at the sizes where a call is all fixed
// cost (one layer, one direction).
Tensor part(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return start == 0 && length == t.size(dim) ? t : t.narrow(dim, start, length);
}

// The input of layer l: x for the first, else the previous layer's output
// times its dropout mask.
Tensor layer_input(const Tensor& x, const Tensor& hs, const optional<Tensor>& mask, int64_t l) {
  if (l == 0) return x;
  return mask ? hs[l - 1] * (*mask)[l - 1] : hs[l - 1];
}

// One kind of weight of layer l for both directions, contiguous; undefined
// where the stack has none.
std::array<Tensor, 2> per_direction(at::TensorList w, const Stack& s, int64_t l,
                                    Tensor CellWeights::*kind) {
  std::array<Tensor, 2> out;
  for (int64_t d = 0; d < s.D; ++d) {
    const Tensor t = cell_weights(w, s, l, d).*kind;
    if (t.defined()) out[d] = t.contiguous();
  }
  return out;
}

// The cells' math on tensors of units, differentiable.
struct TensorMath {
  using S = double;
  static Tensor tanh(const Tensor& x) { return at::tanh(x); }
  static Tensor sigmoid(const Tensor& x) { return at::sigmoid(x); }
  static Tensor relu(const Tensor& x) { return at::relu(x); }
  static Tensor relu_backward(const Tensor& g, const Tensor& h) {
    return at::threshold_backward(g, h, 0);
  }
  static Tensor mul_add(const Tensor& a, const Tensor& b, const Tensor& c) { return a * b + c; }
};

// The cell's output before the projection, (T*N, H), from the workspace of
// one direction, ws_d (T, N, Ws): the saved values, then c.
Tensor projection_input(const Stack& s, const Tensor& ws_d) {
  return with_cell(s.cell, [&](auto c) -> Tensor {
    using Cell = decltype(c);
    if constexpr (Cell::kProjections) {
      Tensor saved[Cell::kSaved];
      for (int k = 0; k < Cell::kSaved; ++k) saved[k] = ws_d.narrow(2, k * s.H, s.H);
      return Cell::template output<TensorMath, Tensor>(saved, ws_d.narrow(2, Cell::kSaved * s.H, s.H))
          .reshape({-1, s.H});
    } else {
      TORCH_CHECK(false, "this cell has no projections");
    }
  });
}

// out = a b, or out += a b where `add`: on the CPU with the same bits on
// any number of threads (product_cpu), elsewhere ATen's GEMM.
void product_into(Tensor out, const Tensor& a, const Tensor& b, bool add) {
  if (out.is_cpu()) {
    product_cpu(out, a, b, add);
  } else if (add) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// a b into a recycled() buffer of its own: a weight's gradient (W_hh's 16
// MB for an LSTM of hidden 1024), which the caller's autograd frees after
// each call.
Tensor mm_buffer(const Tensor& a, const Tensor& b) {
  Tensor out = recycled({a.size(0), b.size(1)}, a.options());
  product_into(out, a, b, false);
  return out;
}

// W_hh's gradient of direction d: the sum over steps of dgh_t^T times the
// state before step t. That state is the output of the step before it in
// d's order, and h0_d (N, P) at each row's first step. Direction 0 starts
// every row at step 0; direction 1 at T - 1, or where first_step (T, N, 1)
// says with lengths. Past a row's end it is whatever: the gradients it meets
// there are zero. Without lengths, on views of h0's rows and the output's
// rather than a copy of every state: two GEMMs, or one pass of the narrow
// tiles (narrow_weight_grad_cpu) where `narrow`.
Tensor hidden_weight_grad(const Tensor& dgh_flat, const Tensor& out_d, const Tensor& h0_d,
                          int64_t d, const Tensor& first_step, bool narrow) {
  const int64_t T = out_d.size(0), N = out_d.size(1), P = out_d.size(2);
  const auto product = [&](const Tensor& g, const Tensor& z) {
    return narrow ? narrow_weight_grad_cpu(g, z) : mm_buffer(g.t(), z);
  };
  if (T == 1) return product(dgh_flat, h0_d);
  if (d == 1 && first_step.defined()) {
    const Tensor h0_step = h0_d.unsqueeze(0);
    const Tensor shifted = at::cat({out_d.narrow(0, 1, T - 1), h0_step});
    return product(dgh_flat, at::where(first_step, h0_step, shifted).view({T * N, P}));
  }
  // Direction 0: h0 before step 0, y_{t-1} before t; direction 1: h0
  // before T - 1, y_{t+1} before t.
  const Tensor before = out_d.narrow(0, d == 0 ? 0 : 1, T - 1).reshape({(T - 1) * N, P});
  if (narrow) {
    return d == 0 ? narrow_weight_grad_cpu(dgh_flat, h0_d, before)
                  : narrow_weight_grad_cpu(dgh_flat, before, h0_d);
  }
  const int64_t first = d == 0 ? 0 : (T - 1) * N, rest = d == 0 ? N : 0;
  Tensor g = mm_buffer(dgh_flat.narrow(0, first, N).t(), h0_d);
  product_into(g, dgh_flat.narrow(0, rest, (T - 1) * N).t(), before, true);
  return g;
}

// b_hh's gradient where the cell keeps it apart from b_ih (kHiddenBias):
// dgh's sum over rows. In the gates that add the input and hidden terms,
// dgh is dgi, whose sum b_ih's gradient already holds; only the gates that
// take their input term apart need a sum of their own.
Tensor hidden_bias_grad(const Tensor& dgh_flat, const Tensor& input_bias_grad, const Stack& s) {
  const int64_t apart = with_cell(s.cell, [](auto cell) { return decltype(cell)::kInputApart; });
  const int64_t added = (s.G - apart) * s.H;
  return at::cat({input_bias_grad.narrow(0, 0, added),
                  dgh_flat.narrow(1, added, apart * s.H).sum(0)});
}

// The calls whose weight gradients the CPU kernels' one pass computes
// instead of ATen's GEMMs and sums: at most kFewRows rows (steps times
// batch), and weight gradients of at most kFewGradBytes, which its plain
// stores leave in L3 (32 MB on the development machine). The pass writes
// each gradient once (MKL zeroes a GEMM's output before it adds to it),
// saves the dispatch of five ops, and shares each row's load between two
// units. Measured here (a cell's forward+backward against torch.nn's, one
// thread, GEMMs -> one pass): RNNCell 256->512 batch 8 1.00x -> 1.22x,
// GRUCell alike 0.90x -> 1.04x (two threads 1.09x -> 1.70x), LSTMCell
// 1.13x -> 1.30x, LSTMCell 128->256 batch 8 1.08x -> 1.40x; past L3 it
// loses, LSTMCell 1024->1024 (32 MB of gradients) batch 1 1.32x -> 0.87x.
constexpr int64_t kFewRows = 16;
constexpr int64_t kFewGradBytes = int64_t{16} << 20;

// Whether a call's backward products (dW_ih = dgi^T x, dW_hh = dgh^T h, dx
// = dgi W_ih) may run in the CPU kernels rather than ATen's GEMMs: on the
// CPU's own loops, float or double. Then a small call takes them in one
// pass (weight_grads_cpu), and a larger one in the narrow tiles
// (narrow_weight_grad_cpu, narrow_input_grad_cpu) where narrow_*_pays()
// says they win for its numbers of columns.
bool cpu_products(const Tensor& x) {
  return x.is_cpu() && cpu_loop(x) &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

// A layer's weight gradients (into grads, at the layer's place) and, where
// dx is defined, its input's gradient, in one pass of the CPU kernels
// (weight_grads_cpu): one direction, no projection, float or double. The
// rows: x (R, C), h0 (N, P), the output y (R, P), the gate gradients
// dgi and dgh (R, G*H).
void one_pass_weight_grads(const Stack& s, int64_t l, at::TensorList weights, const Tensor& dgi,
                           const Tensor& dgh, const Tensor& x, const Tensor& h0, const Tensor& y,
                           const Tensor& dx, std::vector<Tensor>& grads) {
  const int64_t k = first_weight(s, l, 0);
  WeightGradLoop g;
  g.dgi = dgi;
  g.dgh = dgh;
  g.x = x.contiguous();
  g.h0 = h0;
  g.y = y;
  g.w_ih = cell_weights(weights, s, l, 0).w_ih.contiguous();
  g.dw_ih = recycled(g.w_ih.sizes(), x.options());
  g.dw_hh = recycled({s.G * s.H, s.P}, x.options());
  if (s.biases) {
    g.db_ih = buffer({s.G * s.H}, x.options());
    g.db_hh = buffer({s.G * s.H}, x.options());
  }
  g.dx = dx;
  weight_grads_cpu(g);
  grads[k] = g.dw_ih;
  grads[k + 1] = g.dw_hh;
  if (s.biases) {
    grads[k + 2] = g.db_ih;
    grads[k + 3] = g.db_hh;
  }
}

thread_local bool keep_workspace = true;

}  // namespace

Tensor shaped(const Tensor& t, at::IntArrayRef sizes) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(
      c10::TensorImpl::VIEW, c10::Storage(t.storage()), t.key_set(), t.dtype());
  impl->set_storage_offset(t.storage_offset());
  impl->set_sizes_contiguous(sizes);
  return Tensor(std::move(impl));
}

bool set_keep_workspace(bool keep) {
  const bool was = keep_workspace;
  keep_workspace = keep;
  return was;
}

StackForward stack_forward(const Stack& s, const Tensor& input, const Tensor& hx,
                           const optional<Tensor>& cx, at::TensorList weights,
                           const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask) {
  const Tensor x = input.contiguous();  // (T, N, C)
  const Tensor h0 = hx.contiguous();    // (L*D, N, P)
  const Tensor c0 = cx ? cx->contiguous() : Tensor();  // (L*D, N, H)
  const optional<Tensor> lens = contiguous(lengths);   // (N)
  const optional<Tensor> mask = contiguous(dropout_mask);
  const auto opt = x.options();
  const bool cell_state = s.cell_state;
  StackForward r;
  r.output = recycled({s.T, s.N, s.DP()}, opt);
  r.h_n = buffer({s.L * s.D, s.N, s.P}, opt);
  if (cell_state) r.c_n = buffer({s.L * s.D, s.N, s.H}, opt);
  r.hidden_states = buffer({s.L - 1, s.T, s.N, s.DP()}, opt);
  // Faulting in a fresh workspace costs about a third of a long CPU
  // forward (42 MB for an LSTM of hidden 256, batch 64, 128 steps): where
  // nothing can read it, none (set_keep_workspace).
  const bool workspace = s.Ws > 0 && (keep_workspace || !cpu_loop(x));
  r.workspace = workspace || s.Ws == 0 ? recycled({s.L, s.D, s.T, s.N, s.Ws}, opt)
                                       : at::zeros({1}, opt).expand({s.L, s.D, s.T, s.N, s.Ws});
  for (int64_t l = 0; l < s.L; ++l) {
    // The time loop computes the input term (input_term(), or in its GEMM)
    // and adds the biases.
    ForwardLoop a;
    a.x = layer_input(x, r.hidden_states, mask, l).contiguous();
    a.w_ih = per_direction(weights, s, l, &CellWeights::w_ih);
    a.w_hh = per_direction(weights, s, l, &CellWeights::w_hh);
    if (s.biases) {
      a.b_ih = per_direction(weights, s, l, &CellWeights::b_ih);
      a.b_hh = per_direction(weights, s, l, &CellWeights::b_hh);
    }
    if (s.proj) a.w_hr = per_direction(weights, s, l, &CellWeights::w_hr);
    a.h0 = part(h0, 0, l * s.D, s.D);
    if (cell_state) a.c0 = part(c0, 0, l * s.D, s.D);
    a.lengths = lens;
    a.y = l == s.L - 1 ? r.output : r.hidden_states[l];
    a.hn = part(r.h_n, 0, l * s.D, s.D);
    if (cell_state) a.cn = part(r.c_n, 0, l * s.D, s.D);
    if (workspace) a.saved = r.workspace[l];
    if (s.T == 0 || s.N == 0) {
      // Nothing for a kernel to do: the last state is the first.
      a.hn.copy_(a.h0);
      if (cell_state) a.cn.copy_(a.c0);
      continue;
    }
    forward_recurrence(s.cell, a);
  }
  return r;
}

StackBackward stack_backward(const Stack& s, const Tensor& input, const Tensor& hx,
                             const optional<Tensor>& cx, at::TensorList weights,
                             const optional<Tensor>& lengths,
                             const optional<Tensor>& dropout_mask, const Tensor& output,
                             const Tensor& hidden_states, const Tensor& workspace,
                             const optional<Tensor>& grad_output, const optional<Tensor>& grad_hn,
                             const optional<Tensor>& grad_cn, bool input_grad,
                             bool state_grad, bool weight_grad) {
  const Tensor x = input.contiguous();           // (T, N, C)
  const Tensor h0 = hx.contiguous();             // (L*D, N, P)
  const Tensor c0 = cx ? cx->contiguous() : Tensor();  // (L*D, N, H)
  const Tensor y = output.contiguous();          // (T, N, D*P)
  // (L-1, T, N, D*P); for one layer, none is read (and may be undefined).
  const Tensor hs = s.L > 1 ? hidden_states.contiguous() : hidden_states;
  // (L, D, T, N, Ws); for a cell that keeps nothing (Ws == 0), none is read
  // (and may be undefined).
  const Tensor ws = s.Ws > 0 ? workspace.contiguous() : workspace;
  const optional<Tensor> lens = contiguous(lengths);
  const optional<Tensor> mask = contiguous(dropout_mask);
  const optional<Tensor> dhn = contiguous(grad_hn);  // (L*D, N, P)
  const optional<Tensor> dcn = contiguous(grad_cn);  // (L*D, N, H)
  const auto opt = x.options();
  const bool cell_state = s.cell_state, split_grad = s.hidden_bias;
  StackBackward r;
  // Without input_grad, the input's gradient (one GEMM of layer 0) is not
  // computed and comes back as zeros.
  r.grad_input = input_grad ? buffer({s.T, s.N, s.C}, opt) : at::zeros({s.T, s.N, s.C}, opt);
  r.grad_hx = buffer({s.L * s.D, s.N, s.P}, opt);
  if (cell_state) r.grad_cx = buffer({s.L * s.D, s.N, s.H}, opt);
  r.grad_weights.resize(weights.size());
  if (s.T == 0) {
    // No step ran: h_n was h0 (c_n was c0), and nothing else saw the weights.
    for (size_t i = 0; i < weights.size(); ++i) r.grad_weights[i] = at::zeros_like(weights[i]);
    r.grad_hx = dhn && state_grad ? dhn->clone() : at::zeros_like(r.grad_hx);
    if (cell_state) r.grad_cx = dcn && state_grad ? dcn->clone() : at::zeros_like(r.grad_cx);
    return r;
  }
  const int64_t TN = s.T * s.N, GH = s.G * s.H;
  const Tensor h0_rows = view_of(h0, {s.L * s.D * s.N, s.P});
  // (T, N, 1): the step each row of direction 1 starts at, where lengths
  // make it differ from T - 1.
  const Tensor first_step = lens && s.D == 2
                                ? (at::arange(s.T, lens->options()).view({s.T, 1}) == *lens - 1)
                                      .unsqueeze(2)
                                : Tensor();
  // dy: gradient of the current layer's output, (T, N, D*P). A single step
  // of a single layer and direction (a cell, a streamed call) has its output
  // in h_n: the loop sums the two gradients at that step, so where only h_n
  // has one (as a cell's caller gives), it serves as dy and no zeros are
  // made. Not with lengths: a row of length 0 passes grad_hn to h0 alone.
  optional<Tensor> dhn_last = dhn;
  Tensor dy;
  if (grad_output) {
    dy = grad_output->contiguous();
  } else if (dhn && s.T == 1 && s.L == 1 && s.D == 1 && !lens) {
    dy = *dhn;
    dhn_last.reset();
  } else {
    dy = at::zeros({s.T, s.N, s.DP()}, opt);
  }
  // A small call of one direction on the CPU (a cell's step, a short
  // call): a layer's weight gradients and its input's in one pass of the
  // CPU kernels (weight_grads_cpu) where that pass is mostly the fixed cost
  // it saves. The choice depends on the shapes alone.
  const bool own_products = cpu_products(x);
  const bool few_rows = s.D == 1 && !s.proj && s.N > 0 && TN <= kFewRows && own_products;
  for (int64_t l = s.L - 1; l >= 0; --l) {
    const Tensor out = l == s.L - 1 ? y : hs[l];  // (T, N, D*P)
    const Tensor in = view_of(layer_input(x, hs, mask, l).contiguous(), {TN, s.in_size(l)});
    BackwardLoop b;
    b.dy = dy;
    if (dhn_last) b.dhn = part(*dhn_last, 0, l * s.D, s.D);
    if (dcn) b.dcn = part(*dcn, 0, l * s.D, s.D);
    b.y = out;
    b.h0 = part(h0, 0, l * s.D, s.D);
    if (cell_state) b.c0 = part(c0, 0, l * s.D, s.D);
    if (s.Ws > 0) b.saved = ws[l];
    b.w_hh = per_direction(weights, s, l, &CellWeights::w_hh);
    if (s.proj) b.w_hr = per_direction(weights, s, l, &CellWeights::w_hr);
    b.lengths = lens;
    b.state_grad = state_grad;
    // dgh and dgi as (D*T*N, G*H) rows, and the loop's (D, T, N, G*H) views.
    const Tensor dgh_rows = recycled({s.D * TN, GH}, opt);
    const Tensor dgi_rows = split_grad ? recycled({s.D * TN, GH}, opt) : dgh_rows;
    b.dgh = view_of(dgh_rows, {s.D, s.T, s.N, GH});
    if (split_grad) b.dgi = view_of(dgi_rows, {s.D, s.T, s.N, GH});
    if (s.proj) b.dhr = recycled({s.D, s.T, s.N, s.P}, opt);
    b.dh0 = part(r.grad_hx, 0, l * s.D, s.D);
    if (cell_state) b.dc0 = part(r.grad_cx, 0, l * s.D, s.D);
    if (s.N == 0) {
      b.dgh.zero_();
      if (split_grad) b.dgi.zero_();
      if (s.proj) b.dhr.zero_();
    } else {
      backward_recurrence(s.cell, b);
    }
    Tensor din = l == 0 ? view_of(r.grad_input, {TN, s.C}) : recycled({TN, s.DP()}, opt);
    const bool narrow_dw = own_products && narrow_weight_grad_pays(x, s.in_size(l));
    const bool narrow_dwh = own_products && narrow_weight_grad_pays(x, s.P);
    const bool narrow_dx = own_products && narrow_input_grad_pays(x, s.in_size(l));
    const bool one_pass = weight_grad && few_rows &&
                          GH * (s.in_size(l) + s.P) * x.element_size() <= kFewGradBytes;
    if (one_pass) {
      one_pass_weight_grads(s, l, weights, dgi_rows, dgh_rows, in, part(h0_rows, 0, l * s.N, s.N),
                            view_of(out, {TN, s.P}), l > 0 || input_grad ? din : Tensor(),
                            r.grad_weights);
    } else {
      for (int64_t d = 0; d < s.D; ++d) {
        const int64_t k = first_weight(s, l, d);
        const CellWeights w = cell_weights(weights, s, l, d);
        const Tensor dgh_flat = part(dgh_rows, 0, d * TN, TN);  // (T*N, G*H)
        const Tensor dgi_flat = part(dgi_rows, 0, d * TN, TN);
        if (weight_grad) {
          r.grad_weights[k] =
              narrow_dw ? narrow_weight_grad_cpu(dgi_flat, in) : mm_buffer(dgi_flat.t(), in);
          r.grad_weights[k + 1] = hidden_weight_grad(dgh_flat, part(out, 2, d * s.P, s.P),
                                                     part(h0_rows, 0, (l * s.D + d) * s.N, s.N),
                                                     d, first_step, narrow_dwh);
          if (s.biases) {
            r.grad_weights[k + 2] = dgi_flat.sum(0);
            r.grad_weights[k + 3] = split_grad
                                        ? hidden_bias_grad(dgh_flat, r.grad_weights[k + 2], s)
                                        : r.grad_weights[k + 2].clone();
          }
          if (s.proj) {
            r.grad_weights[k + (s.biases ? 4 : 2)] =
                mm_buffer(b.dhr[d].view({TN, s.P}).t(), projection_input(s, ws[l][d]));
          }
        }
        if (l > 0 || input_grad) {
          if (narrow_dx) {
            narrow_input_grad_cpu(dgi_flat, w.w_ih.contiguous(), din, d == 1);
          } else {
            product_into(din, dgi_flat, w.w_ih, d == 1);
          }
        }
      }
    }
    if (l > 0) {
      dy = din.view({s.T, s.N, s.DP()});
      if (mask) dy = dy * (*mask)[l - 1];
    }
  }
  // Without state_grad, the CPU kernels leave the states' gradients
  // unwritten and skip what makes them (for a single step, one of its four
  // GEMMs); they come back as zeros from every device.
  if (!state_grad) {
    zero_buffer(r.grad_hx);
    if (cell_state) zero_buffer(r.grad_cx);
  }
  return r;
}

namespace {

template <typename Cell>
StackForward forward_by_steps(const Stack& s, const Tensor& x, const Tensor& hx,
                                     const optional<Tensor>& cx, at::TensorList weights,
                                     const optional<Tensor>& lengths,
                                     const optional<Tensor>& mask) {
  constexpr int G = Cell::kGates;
  const int64_t H = s.H;
  Tensor layer_in = x;  // (T, N, C_l)
  std::vector<Tensor> h_n, c_n, hidden_states;
  for (int64_t l = 0; l < s.L; ++l) {
    if (l > 0 && mask) layer_in = layer_in * (*mask)[l - 1];
    std::vector<Tensor> outs;
    for (int64_t d = 0; d < s.D; ++d) {
      const CellWeights w = cell_weights(weights, s, l, d);
      Tensor u = at::matmul(layer_in, w.w_ih.t());  // (T, N, G*H)
      if (s.biases) u = u + (Cell::kHiddenBias ? w.b_ih : w.b_ih + w.b_hh);
      Tensor bh[G];
      for (int g = 0; g < G; ++g)
        bh[g] = Cell::kHiddenBias && s.biases ? w.b_hh.narrow(0, g * H, H)
                                              : at::zeros({H}, x.options());
      Tensor h = hx[l * s.D + d];                       // (N, P)
      Tensor c = cx ? (*cx)[l * s.D + d] : Tensor();    // (N, H)
      std::vector<Tensor> ys(s.T);
      for (int64_t step = 0; step < s.T; ++step) {
        const int64_t t = d == 0 ? step : s.T - 1 - step;
        const Tensor hw_all = at::matmul(h, w.w_hh.t());  // (N, G*H)
        Tensor ug[G], hw[G], saved[Cell::kSaved > 0 ? Cell::kSaved : 1];
        for (int g = 0; g < G; ++g) {
          ug[g] = u[t].narrow(1, g * H, H);
          hw[g] = hw_all.narrow(1, g * H, H);
        }
        Tensor c_new = c, h_new;
        Cell::template forward<TensorMath, Tensor>(ug, hw, bh, h, c_new, h_new, saved);
        if (s.proj) h_new = at::matmul(h_new, w.w_hr.t());
        if (lengths) {
          const Tensor on = (*lengths > t).unsqueeze(1);  // (N, 1)
          ys[t] = at::where(on, h_new, at::zeros_like(h_new));
          h = at::where(on, h_new, h);
          if (c.defined()) c = at::where(on, c_new, c);
        } else {
          ys[t] = h = h_new;
          c = c_new;
        }
      }
      outs.push_back(s.T ? at::stack(ys) : layer_in.new_zeros({0, s.N, s.P}));
      h_n.push_back(h);
      if (c.defined()) c_n.push_back(c);
    }
    layer_in = at::cat(outs, 2);
    if (l < s.L - 1) hidden_states.push_back(layer_in);
  }
  StackForward r;
  r.output = layer_in;
  r.h_n = at::stack(h_n);
  if (!c_n.empty()) r.c_n = at::stack(c_n);
  r.hidden_states = hidden_states.empty() ? x.new_zeros({0, s.T, s.N, s.DP()})
                                          : at::stack(hidden_states);
  r.workspace = at::zeros({1}, x.options()).expand({s.L, s.D, s.T, s.N, s.Ws});
  return r;
}

}  // namespace

StackForward stack_forward_by_steps(const Stack& s, const Tensor& input, const Tensor& hx,
                                    const optional<Tensor>& cx, at::TensorList weights,
                                    const optional<Tensor>& lengths,
                                    const optional<Tensor>& dropout_mask) {
  return with_cell(s.cell, [&](auto c) {
    return forward_by_steps<decltype(c)>(s, input, hx, cx, weights, lengths, dropout_mask);
  });
}

}  // namespace fastrnn
