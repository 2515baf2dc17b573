// The fastrnn ops: one schema each for the forward and the backward of a whole
// Elman RNN stack (all layers and directions), the named checks of their
// arguments, and the device-independent orchestration: layers, directions and
// every GEMM go through ATen, and only the time loop of a layer is handed to
// the device's kernel (recurrence_cpu.cpp, cuda/recurrence_cuda.cpp).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "recurrence.h"

namespace fastrnn {
namespace {

using at::Tensor;
using std::optional;

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

void check_shape(const Tensor& t, const std::string& name, const char* letters,
                 at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", letters, " = ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
}

void check_like(const Tensor& t, const std::string& name, const Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), name, " must be on the input's device ",
              input.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
              input.scalar_type(), ", got ", t.scalar_type());
}

// Sizes of a stack, read from its arguments and checked against each other.
struct Stack {
  int64_t T, N, C, H, L, D;
  bool biases;
  int64_t per_cell() const { return biases ? 4 : 2; }
  int64_t DH() const { return D * H; }
  int64_t in_size(int64_t l) const { return l == 0 ? C : D * H; }
};

std::string weight_name(const char* kind, int64_t l, int64_t d) {
  return std::string(kind) + "_l" + std::to_string(l) + (d ? "_reverse" : "");
}

// weights holds, per layer and then per direction, w_ih (H, C_l), w_hh (H, H)
// and, with biases, b_ih (H) and b_hh (H), as nn.RNN's _flat_weights does.
const Tensor& weight(at::TensorList w, const Stack& s, int64_t l, int64_t d, int64_t k) {
  return w[(l * s.D + d) * s.per_cell() + k];
}

Stack check_args(const Tensor& input, const Tensor& hx, at::TensorList weights,
                 const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask,
                 int64_t num_layers, bool bidirectional, bool has_biases) {
  TORCH_CHECK(input.dim() == 3, "input must have shape (T, N, C), got ", shape_str(input.sizes()));
  TORCH_CHECK(input.is_cpu() || input.is_cuda(),
              "fastrnn supports CPU and CUDA tensors, got input on ", input.device());
  // The CUDA kernels (or their CPU emulator) take half types too.
#ifdef FASTRNN_WITH_CUDA
  const bool cuda_kernels = input.is_cuda() || cuda_emulation();
#else
  const bool cuda_kernels = input.is_cuda();
#endif
  const auto dt = input.scalar_type();
  if (cuda_kernels) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                "fastrnn on CUDA supports float32, float64, float16 and bfloat16 input, got ", dt);
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble,
                "fastrnn on CPU supports float32 and float64 input, got ", dt);
  }
  TORCH_CHECK(num_layers >= 1, "num_layers must be at least 1, got ", num_layers);
  Stack s;
  s.T = input.size(0);
  s.N = input.size(1);
  s.C = input.size(2);
  s.L = num_layers;
  s.D = bidirectional ? 2 : 1;
  s.biases = has_biases;
  const int64_t expected = s.L * s.D * s.per_cell();
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == expected, "weights must hold ", expected,
              " tensors for ", s.L, " layer(s) and ", s.D, " direction(s) ",
              has_biases ? "with" : "without", " biases, got ", weights.size());
  TORCH_CHECK(hx.dim() == 3, "hx must have shape (L*D, N, H), got ", shape_str(hx.sizes()));
  s.H = hx.size(2);
  check_shape(hx, "hx", "(L*D, N, H)", {s.L * s.D, s.N, s.H});
  check_like(hx, "hx", input);
  for (int64_t l = 0; l < s.L; ++l) {
    for (int64_t d = 0; d < s.D; ++d) {
      const std::string w_ih = weight_name("weight_ih", l, d), w_hh = weight_name("weight_hh", l, d);
      check_shape(weight(weights, s, l, d, 0), w_ih, l == 0 ? "(H, C)" : "(H, D*H)",
                  {s.H, s.in_size(l)});
      check_like(weight(weights, s, l, d, 0), w_ih, input);
      check_shape(weight(weights, s, l, d, 1), w_hh, "(H, H)", {s.H, s.H});
      check_like(weight(weights, s, l, d, 1), w_hh, input);
      if (has_biases) {
        for (int64_t k = 2; k < 4; ++k) {
          const std::string b = weight_name(k == 2 ? "bias_ih" : "bias_hh", l, d);
          check_shape(weight(weights, s, l, d, k), b, "(H,)", {s.H});
          check_like(weight(weights, s, l, d, k), b, input);
        }
      }
    }
  }
  if (lengths) {
    check_shape(*lengths, "lengths", "(N,)", {s.N});
    TORCH_CHECK(lengths->scalar_type() == at::kLong, "lengths must be int64, got ",
                lengths->scalar_type());
    TORCH_CHECK(lengths->device() == input.device(), "lengths must be on the input's device ",
                input.device(), ", got ", lengths->device());
  }
  if (dropout_mask) {
    check_shape(*dropout_mask, "dropout_mask", "(L-1, T, N, D*H)",
                {s.L - 1, s.T, s.N, s.DH()});
    check_like(*dropout_mask, "dropout_mask", input);
  }
  return s;
}

// The device's time loop. Without a step or a row there is nothing for a
// kernel to do: h_n is h0 and dh0 is dh_n.
void forward_recurrence(const Tensor& u, const Tensor& w_hh_t, const Tensor& h0,
                        const optional<Tensor>& lengths, const Tensor& y, const Tensor& hn,
                        bool relu) {
  if (u.size(1) == 0 || u.size(2) == 0) {
    hn.copy_(h0);
    return;
  }
#ifdef FASTRNN_WITH_CUDA
  if (u.is_cuda() || cuda_emulation())
    return forward_recurrence_cuda(u, w_hh_t, h0, lengths, y, hn, relu);
#else
  TORCH_CHECK(!u.is_cuda(), "fastrnn was built without CUDA: rebuild with FASTRNN_CUDA=1");
#endif
  forward_recurrence_cpu(u, w_hh_t, h0, lengths, y, hn, relu);
}

void backward_recurrence(const Tensor& dy, const optional<Tensor>& dhn, const Tensor& y,
                         const Tensor& w_hh, const optional<Tensor>& lengths, const Tensor& dz,
                         const Tensor& dh0, bool relu) {
  if (dz.size(1) == 0 || dz.size(2) == 0) {
    if (dhn) dh0.copy_(*dhn);
    else dh0.zero_();
    return;
  }
#ifdef FASTRNN_WITH_CUDA
  if (dz.is_cuda() || cuda_emulation())
    return backward_recurrence_cuda(dy, dhn, y, w_hh, lengths, dz, dh0, relu);
#else
  TORCH_CHECK(!dz.is_cuda(), "fastrnn was built without CUDA: rebuild with FASTRNN_CUDA=1");
#endif
  backward_recurrence_cpu(dy, dhn, y, w_hh, lengths, dz, dh0, relu);
}

// W_hh of every direction of layer l, stacked: (D, H, H), transposed or not.
Tensor stacked_w_hh(at::TensorList w, const Stack& s, int64_t l, bool transpose) {
  std::vector<Tensor> ws;
  for (int64_t d = 0; d < s.D; ++d) {
    const Tensor& m = weight(w, s, l, d, 1);
    ws.push_back(transpose ? m.t() : m);
  }
  return at::stack(ws).contiguous();
}

// The input of layer l: x for the first, else the previous layer's output
// times its dropout mask.
Tensor layer_input(const Tensor& x, const Tensor& hs, const optional<Tensor>& mask, int64_t l) {
  if (l == 0) return x;
  return mask ? hs[l - 1] * (*mask)[l - 1] : hs[l - 1];
}

std::tuple<Tensor, Tensor, Tensor> rnn_forward(const Tensor& input, const Tensor& hx,
                                               at::TensorList weights,
                                               const optional<Tensor>& lengths,
                                               const optional<Tensor>& dropout_mask,
                                               int64_t num_layers, bool bidirectional,
                                               bool has_biases, bool relu) {
  const Stack s = check_args(input, hx, weights, lengths, dropout_mask, num_layers,
                             bidirectional, has_biases);
  const Tensor x = input.contiguous();                      // (T, N, C)
  const Tensor h0 = hx.contiguous();                        // (L*D, N, H)
  const optional<Tensor> lens =
      lengths ? optional<Tensor>(lengths->contiguous()) : std::nullopt;  // (N)
  const optional<Tensor> mask =
      dropout_mask ? optional<Tensor>(dropout_mask->contiguous()) : std::nullopt;
  Tensor y = at::empty({s.T, s.N, s.DH()}, x.options());          // (T, N, D*H)
  Tensor hn = at::empty({s.L * s.D, s.N, s.H}, x.options());      // (L*D, N, H)
  Tensor hs = at::empty({s.L - 1, s.T, s.N, s.DH()}, x.options());  // (L-1, T, N, D*H)
  for (int64_t l = 0; l < s.L; ++l) {
    const Tensor in = layer_input(x, hs, mask, l).reshape({s.T * s.N, s.in_size(l)});
    Tensor u = at::empty({s.D, s.T * s.N, s.H}, x.options());  // (D, T*N, H)
    for (int64_t d = 0; d < s.D; ++d) {
      const Tensor& w_ih = weight(weights, s, l, d, 0);
      Tensor u_d = u[d];
      if (has_biases) {
        at::addmm_out(u_d, weight(weights, s, l, d, 2) + weight(weights, s, l, d, 3), in,
                      w_ih.t());
      } else {
        at::mm_out(u_d, in, w_ih.t());
      }
    }
    const Tensor out = l == s.L - 1 ? y : hs[l];
    forward_recurrence(u.view({s.D, s.T, s.N, s.H}), stacked_w_hh(weights, s, l, true),
                       h0.narrow(0, l * s.D, s.D), lens, out, hn.narrow(0, l * s.D, s.D), relu);
  }
  return {y, hn, hs};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> rnn_backward(
    const Tensor& input, const Tensor& hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, const Tensor& output,
    const Tensor& hidden_states, const optional<Tensor>& grad_output,
    const optional<Tensor>& grad_hn, int64_t num_layers, bool bidirectional, bool has_biases,
    bool relu, bool input_grad) {
  const Stack s = check_args(input, hx, weights, lengths, dropout_mask, num_layers,
                             bidirectional, has_biases);
  check_shape(output, "output", "(T, N, D*H)", {s.T, s.N, s.DH()});
  check_like(output, "output", input);
  check_shape(hidden_states, "hidden_states", "(L-1, T, N, D*H)", {s.L - 1, s.T, s.N, s.DH()});
  check_like(hidden_states, "hidden_states", input);
  if (grad_output) {
    check_shape(*grad_output, "grad_output", "(T, N, D*H)", {s.T, s.N, s.DH()});
    check_like(*grad_output, "grad_output", input);
  }
  if (grad_hn) {
    check_shape(*grad_hn, "grad_hn", "(L*D, N, H)", {s.L * s.D, s.N, s.H});
    check_like(*grad_hn, "grad_hn", input);
  }
  const Tensor x = input.contiguous();        // (T, N, C)
  const Tensor h0 = hx.contiguous();          // (L*D, N, H)
  const Tensor y = output.contiguous();       // (T, N, D*H)
  const Tensor hs = hidden_states.contiguous();  // (L-1, T, N, D*H)
  const optional<Tensor> lens =
      lengths ? optional<Tensor>(lengths->contiguous()) : std::nullopt;  // (N)
  const optional<Tensor> mask =
      dropout_mask ? optional<Tensor>(dropout_mask->contiguous()) : std::nullopt;
  const optional<Tensor> dhn =
      grad_hn ? optional<Tensor>(grad_hn->contiguous()) : std::nullopt;  // (L*D, N, H)

  // Without input_grad, the input's gradient (one GEMM of layer 0) is not
  // computed and comes back as zeros.
  Tensor grad_x = input_grad ? at::empty({s.T, s.N, s.C}, x.options())
                             : at::zeros({s.T, s.N, s.C}, x.options());
  Tensor grad_hx = at::empty({s.L * s.D, s.N, s.H}, x.options());
  std::vector<Tensor> grad_w(weights.size());
  if (s.T == 0) {
    // No step ran: h_n was h0, and nothing else saw the weights.
    for (size_t i = 0; i < weights.size(); ++i) grad_w[i] = at::zeros_like(weights[i]);
    return {grad_x, dhn ? dhn->clone() : at::zeros_like(grad_hx), grad_w};
  }
  // dy: gradient of the current layer's output, (T, N, D*H).
  Tensor dy = grad_output ? grad_output->contiguous() : at::zeros({s.T, s.N, s.DH()}, x.options());
  const int64_t TN = s.T * s.N;
  for (int64_t l = s.L - 1; l >= 0; --l) {
    const Tensor out = l == s.L - 1 ? y : hs[l];  // (T, N, D*H)
    const Tensor in = layer_input(x, hs, mask, l).reshape({TN, s.in_size(l)});
    Tensor dz = at::empty({s.D, s.T, s.N, s.H}, x.options());  // (D, T, N, H)
    const optional<Tensor> dhn_l =
        dhn ? optional<Tensor>(dhn->narrow(0, l * s.D, s.D)) : std::nullopt;
    backward_recurrence(dy, dhn_l, out, stacked_w_hh(weights, s, l, false), lens, dz,
                        grad_hx.narrow(0, l * s.D, s.D), relu);
    Tensor din = l == 0 ? grad_x.view({TN, s.C}) : at::empty({TN, s.DH()}, x.options());
    for (int64_t d = 0; d < s.D; ++d) {
      const int64_t k = (l * s.D + d) * s.per_cell();
      const Tensor dz_d = dz[d];                 // (T, N, H)
      const Tensor dz_flat = dz_d.view({TN, s.H});
      const Tensor& w_ih = weight(weights, s, l, d, 0);
      grad_w[k] = at::mm(dz_flat.t(), in);
      // dW_hh = sum over steps of dz_t^T h_prev(t): the previous step's output
      // inside the sequence, h0 at its first step.
      const Tensor out_d = out.narrow(2, d * s.H, s.H);  // (T, N, H), row stride D*H
      const Tensor h0_d = h0[l * s.D + d];                // (N, H)
      Tensor dz_first;                                    // (N, H) dz at each row's first step
      if (d == 0) {
        dz_first = dz_d[0];
      } else if (lens) {
        const Tensor idx = (*lens - 1).clamp(0, s.T - 1).view({1, s.N, 1}).expand({1, s.N, s.H});
        dz_first = dz_d.gather(0, idx).squeeze(0);
      } else {
        dz_first = dz_d[s.T - 1];
      }
      Tensor gw_hh = at::mm(dz_first.t(), h0_d);
      if (s.T > 1) {
        // Forward: dz[1:] with out[:-1]. Reverse: dz[:-1] with out[1:]; with
        // lengths, out is zero past each row's end, so the pairs that straddle
        // it add nothing and the first step comes from dz_first above.
        const Tensor a = dz_d.narrow(0, d == 0 ? 1 : 0, s.T - 1).reshape({(s.T - 1) * s.N, s.H});
        const Tensor b = out_d.narrow(0, d == 0 ? 0 : 1, s.T - 1).reshape({(s.T - 1) * s.N, s.H});
        gw_hh.addmm_(a.t(), b);
      }
      grad_w[k + 1] = gw_hh;
      if (has_biases) {
        grad_w[k + 2] = dz_flat.sum(0);
        grad_w[k + 3] = grad_w[k + 2].clone();
      }
      if (l > 0 || input_grad) {
        if (d == 0) {
          at::mm_out(din, dz_flat, w_ih);
        } else {
          din.addmm_(dz_flat, w_ih);
        }
      }
    }
    if (l > 0) {
      dy = din.view({s.T, s.N, s.DH()});
      if (mask) dy = dy * (*mask)[l - 1];
    }
  }
  return {grad_x, grad_hx, grad_w};
}

// The stack's forward as plain differentiable ATen ops, one step at a time.
// Only for double backward: when a graph of the backward is asked for, the
// backward differentiates this instead of calling the fused backward op.
std::tuple<Tensor, Tensor> forward_by_steps(const Tensor& x, const Tensor& hx,
                                            at::TensorList weights,
                                            const optional<Tensor>& lengths,
                                            const optional<Tensor>& mask, const Stack& s,
                                            bool relu) {
  Tensor layer_in = x;  // (T, N, C_l)
  std::vector<Tensor> h_n;
  for (int64_t l = 0; l < s.L; ++l) {
    if (l > 0 && mask) layer_in = layer_in * (*mask)[l - 1];
    std::vector<Tensor> outs;
    for (int64_t d = 0; d < s.D; ++d) {
      Tensor u = at::matmul(layer_in, weight(weights, s, l, d, 0).t());  // (T, N, H)
      if (s.biases) u = u + weight(weights, s, l, d, 2) + weight(weights, s, l, d, 3);
      const Tensor w_hh_t = weight(weights, s, l, d, 1).t();
      Tensor h = hx[l * s.D + d];  // (N, H)
      std::vector<Tensor> ys(s.T);
      for (int64_t step = 0; step < s.T; ++step) {
        const int64_t t = d == 0 ? step : s.T - 1 - step;
        const Tensor z = u[t] + at::matmul(h, w_hh_t);
        const Tensor h_new = relu ? at::relu(z) : at::tanh(z);
        if (lengths) {
          const Tensor on = (*lengths > t).unsqueeze(1);  // (N, 1)
          ys[t] = at::where(on, h_new, at::zeros_like(h_new));
          h = at::where(on, h_new, h);
        } else {
          ys[t] = h = h_new;
        }
      }
      outs.push_back(at::stack(ys));
      h_n.push_back(h);
    }
    layer_in = at::cat(outs, 2);
  }
  return {layer_in, at::stack(h_n)};
}

// Autograd of rnn_forward, in C++ so that a call costs no Python: the
// backward is the rnn_backward op. Both are called through the dispatcher, so
// under torch.compile the fake kernels stand in for them.
class RnnFunction : public torch::autograd::Function<RnnFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& input, const Tensor& hx,
      at::TensorList weights, const optional<Tensor>& lengths,
      const optional<Tensor>& dropout_mask, int64_t num_layers, bool bidirectional,
      bool has_biases, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastrnn::rnn_forward", "")
                         .typed<decltype(rnn_forward)>();
    auto [y, hn, hs] = op.call(input, hx, weights, lengths, dropout_mask, num_layers,
                               bidirectional, has_biases, relu);
    ctx->mark_non_differentiable({hs});
    std::vector<Tensor> saved = {input, hx, y, hs,
                                 lengths ? *lengths : Tensor(),
                                 dropout_mask ? *dropout_mask : Tensor()};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["relu"] = relu;
    return {y, hn, hs};
  }

  // create_graph=True: the gradients as differentiable functions of the
  // inputs, through forward_by_steps, so that they can be differentiated again.
  static torch::autograd::variable_list backward_with_graph(
      const torch::autograd::variable_list& saved, const std::vector<Tensor>& weights,
      const optional<Tensor>& lengths, const optional<Tensor>& mask,
      const torch::autograd::variable_list& grads, int64_t num_layers, bool bidirectional,
      bool has_biases, bool relu) {
    const Stack s = check_args(saved[0], saved[1], weights, lengths, mask, num_layers,
                               bidirectional, has_biases);
    auto [y, hn] = forward_by_steps(saved[0], saved[1], weights, lengths, mask, s, relu);
    std::vector<Tensor> inputs = {saved[0], saved[1]};
    inputs.insert(inputs.end(), weights.begin(), weights.end());
    std::vector<Tensor> wanted;
    for (const Tensor& t : inputs)
      if (t.requires_grad()) wanted.push_back(t);
    std::vector<Tensor> outputs, grad_outputs;
    if (grads[0].defined()) outputs.push_back(y), grad_outputs.push_back(grads[0]);
    if (grads[1].defined()) outputs.push_back(hn), grad_outputs.push_back(grads[1]);
    torch::autograd::variable_list out(inputs.size() + 6);
    if (wanted.empty() || outputs.empty()) return out;
    const auto g = torch::autograd::grad(outputs, wanted, grad_outputs, /*retain_graph=*/true,
                                         /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t i = 0, k = 0; i < inputs.size(); ++i)
      if (inputs[i].requires_grad()) out[i] = g[k++];
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastrnn::rnn_backward", "")
                         .typed<decltype(rnn_backward)>();
    const auto saved = ctx->get_saved_variables();
    const std::vector<Tensor> weights(saved.begin() + 6, saved.end());
    auto as_optional = [](const Tensor& t) {
      return t.defined() ? optional<Tensor>(t) : std::nullopt;
    };
    const int64_t num_layers = ctx->saved_data["num_layers"].toInt();
    const bool bidirectional = ctx->saved_data["bidirectional"].toBool();
    const bool has_biases = ctx->saved_data["has_biases"].toBool();
    const bool relu = ctx->saved_data["relu"].toBool();
    if (torch::autograd::GradMode::is_enabled() && saved[0].size(0) > 0) {
      return backward_with_graph(saved, weights, as_optional(saved[4]), as_optional(saved[5]),
                                 grads, num_layers, bidirectional, has_biases, relu);
    }
    const bool input_grad = ctx->needs_input_grad(0);
    auto [grad_input, grad_hx, grad_weights] =
        op.call(saved[0], saved[1], weights, as_optional(saved[4]), as_optional(saved[5]),
                saved[2], saved[3], as_optional(grads[0]), as_optional(grads[1]), num_layers,
                bidirectional, has_biases, relu, input_grad);
    // One gradient per forward argument, the weights one by one; none for
    // lengths, the mask and the flags, nor for an input that needs none.
    torch::autograd::variable_list out = {input_grad ? grad_input : Tensor(), grad_hx};
    out.insert(out.end(), grad_weights.begin(), grad_weights.end());
    out.resize(out.size() + 6);
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> rnn_forward_autograd(
    const Tensor& input, const Tensor& hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, bool relu) {
  auto out = RnnFunction::apply(input, hx, weights, lengths, dropout_mask, num_layers,
                                bidirectional, has_biases, relu);
  return {out[0], out[1], out[2]};
}

// Under torch.autocast on CUDA the layer runs in the autocast dtype, as
// nn.RNN's cuDNN path does: floating arguments are cast, then the op runs.
std::tuple<Tensor, Tensor, Tensor> rnn_forward_autocast_cuda(
    const Tensor& input, const Tensor& hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, bool relu) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const auto dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dtype, t, at::kCUDA); };
  std::vector<Tensor> w;
  for (const Tensor& t : weights) w.push_back(cast(t));
  const optional<Tensor> mask =
      dropout_mask ? optional<Tensor>(cast(*dropout_mask)) : std::nullopt;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastrnn::rnn_forward", "")
                       .typed<decltype(rnn_forward)>();
  return op.call(cast(input), cast(hx), w, lengths, mask, num_layers, bidirectional, has_biases,
                 relu);
}

}  // namespace

TORCH_LIBRARY(fastrnn, m) {
  m.def(
      "rnn_forward(Tensor input, Tensor hx, Tensor[] weights, Tensor? lengths, "
      "Tensor? dropout_mask, int num_layers, bool bidirectional, bool has_biases, bool relu) "
      "-> (Tensor output, Tensor h_n, Tensor hidden_states)");
  m.def(
      "rnn_backward(Tensor input, Tensor hx, Tensor[] weights, Tensor? lengths, "
      "Tensor? dropout_mask, Tensor output, Tensor hidden_states, Tensor? grad_output, "
      "Tensor? grad_hn, int num_layers, bool bidirectional, bool has_biases, bool relu, "
      "bool input_grad=True) -> (Tensor grad_input, Tensor grad_hx, Tensor[] grad_weights)");
}

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
}

TORCH_LIBRARY_IMPL(fastrnn, Autograd, m) { m.impl("rnn_forward", &rnn_forward_autograd); }

TORCH_LIBRARY_IMPL(fastrnn, AutocastCUDA, m) {
  m.impl("rnn_forward", &rnn_forward_autocast_cuda);
}

#ifdef FASTRNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
}
#endif

}  // namespace fastrnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn's fused Elman RNN recurrence; the ops are torch.ops.fastrnn.*";
#ifdef FASTRNN_WITH_CUDA
  m.attr("cuda_built") = true;
  m.def("set_cuda_path", &fastrnn::set_cuda_path, pybind11::arg("name"), pybind11::arg("blocks") = 0,
        "Force the CUDA time loop's path: 'auto', 'persistent', 'cluster', 'grid' or 'step', "
        "and for 'cluster' and 'grid' the blocks per cluster or group (0: chosen per call)");
  m.def("last_cuda_path", &fastrnn::last_cuda_path,
        "The path the last CUDA time loop on this thread took");
  m.def("set_cuda_emulation", &fastrnn::set_cuda_emulation,
        "Run the CUDA kernels on CPU threads for CPU tensors (tests only)");
#else
  m.attr("cuda_built") = false;
#endif
  m.def("cpu_isa", &fastrnn::cpu_isa, "The instruction set the CPU kernels run with");
  m.def("set_cpu_isa", &fastrnn::set_cpu_isa,
        "Force the CPU kernels' instruction set ('avx512', 'avx2', 'base' or 'auto'); "
        "returns False when this processor lacks it");
}
