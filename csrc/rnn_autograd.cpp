// The forward op's autograd and autocast kernels, one of each for every cell.
//
// Autograd is C++, so that a call costs no Python: one autograd Function
// serves every cell, its backward is the backward op, and both ops are
// called through the dispatcher, so that under torch.compile the fake
// kernels stand in for them. Where a C++ autograd Function cannot serve —
// under function transforms (torch.func.grad, vmap over a gradient, jvp, ...)
// and forward-mode AD — the op runs its stack step by step in ATen ops
// instead (rnn_stack.h), which every transform understands; so does the
// backward when a graph of it is asked for (double backward) and for
// gradients batched by torch's older vmap (is_grads_batched).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/autocast_mode.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/library.h>

#include "recurrence.h"
#include "rnn_args.h"
#include "rnn_ops.h"
#include "rnn_stack.h"

namespace fastrnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (N, C) or (C) as one step of a layer: (1, N, C) or (1, 1, C).
Tensor as_step(const Tensor& t, bool batched) {
  return batched ? t.unsqueeze(0) : t.reshape({1, 1, t.size(0)});
}

// The forward op's arguments, the cell as its kind and the states as h and c.
struct StackCall {
  CellKind cell;
  Tensor input, hx;
  optional<Tensor> cx;
  at::TensorList weights;
  optional<Tensor> lengths, mask;
  int64_t num_layers;
  bool bidirectional, biases, proj;
  // A cell's step: input (N, C) or (C) and states (N, H) or (H), which the
  // op sees as one step of a layer, and the new states in the shape the
  // states came in. Its views are made inside the autograd Function, so
  // that the graph holds no view nodes around it.
  bool step = false;

  // The call as the op takes it: a step's tensors as one step of a layer.
  StackCall layer() const {
    if (!step) return *this;
    const bool batched = input.dim() == 2;
    StackCall c = *this;
    c.input = as_step(input, batched);
    c.hx = as_step(hx, batched);
    if (cx) c.cx = as_step(*cx, batched);
    c.step = false;
    return c;
  }
  std::vector<Tensor> states() const {
    return cx ? std::vector<Tensor>{hx, *cx} : std::vector<Tensor>{hx};
  }
  Stack check() const {
    return check_args(cell, input, states(), weights, lengths, mask, num_layers, bidirectional,
                      biases, proj);
  }
};

template <typename F>
auto typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

// The outputs of the forward op in one list: output, the final states (h_n,
// and c_n for an LSTM), hidden_states, workspace.
variable_list flat(const Tensor& output, const std::vector<Tensor>& state_n,
                   const Tensor& hidden_states, const Tensor& workspace) {
  variable_list out = {output};
  out.insert(out.end(), state_n.begin(), state_n.end());
  out.push_back(hidden_states);
  out.push_back(workspace);
  return out;
}

// The forward op through the dispatcher.
variable_list call_forward(const StackCall& c) {
  static auto op = typed_op<decltype(forward)>("fastrnn::forward");
  auto [y, state_n, hs, ws] = op.call(cell_name(c.cell), c.input, c.states(), c.weights,
                                      c.lengths, c.mask, c.num_layers, c.bidirectional, c.biases,
                                      c.proj);
  return flat(y, state_n, hs, ws);
}

// What call_forward returns, from a StackForward.
variable_list outputs_of(const StackForward& f) {
  return flat(f.output, f.c_n.defined() ? std::vector<Tensor>{f.h_n, f.c_n} : std::vector<Tensor>{f.h_n},
              f.hidden_states, f.workspace);
}

// The forward op's result from call_forward's list.
std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> unflat(const variable_list& out) {
  const size_t n = out.size();
  return {out[0], std::vector<Tensor>(out.begin() + 1, out.end() - 2), out[n - 2], out[n - 1]};
}

// The backward op through the dispatcher: grad_input, grad_hx, grad_cx
// (undefined but for LSTM) and the weights' gradients.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> call_backward(
    const StackCall& c, const Tensor& output, const Tensor& hidden_states,
    const Tensor& workspace, const optional<Tensor>& grad_output, const optional<Tensor>& grad_hn,
    const optional<Tensor>& grad_cn, bool input_grad, bool state_grad) {
  static auto op = typed_op<decltype(backward)>("fastrnn::backward");
  c10::List<optional<Tensor>> grad_state_n;
  grad_state_n.push_back(grad_hn);
  if (c.cx) grad_state_n.push_back(grad_cn);
  auto [gx, ghx, gw] = op.call(cell_name(c.cell), c.input, c.states(), c.weights, c.lengths,
                               c.mask, output, hidden_states, workspace, grad_output, grad_state_n,
                               c.num_layers, c.bidirectional, c.biases, c.proj, input_grad,
                               state_grad);
  return {gx, ghx[0], ghx.size() > 1 ? ghx[1] : Tensor(), gw};
}

optional<Tensor> as_optional(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : std::nullopt;
}

class StackFunction : public torch::autograd::Function<StackFunction> {
 public:
  // Outputs as call_forward's; the hidden states and the workspace are not
  // differentiable.
  static variable_list forward(AutogradContext* ctx, int64_t cell, const Tensor& input,
                               const Tensor& hx, const optional<Tensor>& cx,
                               at::TensorList weights, const optional<Tensor>& lengths,
                               const optional<Tensor>& mask, int64_t num_layers,
                               bool bidirectional, bool biases, bool proj, bool step) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const StackCall c{static_cast<CellKind>(cell), input, hx, cx, weights, lengths, mask,
                      num_layers, bidirectional, biases, proj, step};
    variable_list out = call_forward(c.layer());
    if (step) {
      // The new states in the shape the states came, as tensors of their
      // own to autograd rather than views of the op's.
      out[1] = at::_unsafe_view(out[1], hx.sizes());
      if (cx) out[2] = at::_unsafe_view(out[2], cx->sizes());
    }
    const Tensor& hs = out[out.size() - 2];
    const Tensor& workspace = out.back();
    ctx->mark_non_differentiable({hs, workspace});
    // An output the loss does not reach gets no gradient, rather than one
    // of zeros: backward takes each as optional, and zero-filling the
    // workspace (the largest output) would cost as much as a layer's step.
    ctx->set_materialize_grads(false);
    std::vector<Tensor> saved = {input, hx, cx.value_or(Tensor()), out[0], hs, workspace,
                                 lengths.value_or(Tensor()), mask.value_or(Tensor())};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    // The flags in one integer: one entry of the string-keyed map to fill
    // and to read back.
    ctx->saved_data["flags"] = cell | (int64_t{bidirectional} << 2) | (int64_t{biases} << 3) |
                               (int64_t{proj} << 4) | (int64_t{step} << 5) | (num_layers << 8);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<Tensor> weights(saved.begin() + 8, saved.end());
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const StackCall c{static_cast<CellKind>(flags & 3),
                      saved[0],
                      saved[1],
                      as_optional(saved[2]),
                      weights,
                      as_optional(saved[6]),
                      as_optional(saved[7]),
                      flags >> 8,
                      (flags & 4) != 0,
                      (flags & 8) != 0,
                      (flags & 16) != 0,
                      (flags & 32) != 0};
    const Tensor& grad_output = grads[0];
    const Tensor& grad_hn = grads[1];
    const Tensor grad_cn = c.cx ? grads[2] : Tensor();
    // One gradient per forward argument: none for the cell, the weights one
    // by one, none for lengths, the mask and the flags.
    variable_list out(1 + 3 + weights.size() + 7);
    // Gradients batched by autograd.grad(is_grads_batched=True) (torch's
    // older vmap, which knows only ATen's ops) also take the step-by-step
    // route.
    const bool batched = at::isBatchedTensor(grad_output) || at::isBatchedTensor(grad_hn) ||
                         at::isBatchedTensor(grad_cn);
    if ((torch::autograd::GradMode::is_enabled() || batched) &&
        (c.step || saved[0].size(0) > 0)) {
      backward_with_graph(c, {grad_output, grad_hn, grad_cn}, out);
      return out;
    }
    // Edges count variables only: the input, hx, cx where there is one.
    const bool input_grad = ctx->needs_input_grad(0);
    const bool state_grad = ctx->needs_input_grad(1) || (c.cx && ctx->needs_input_grad(2));
    // The backward op has no autograd of its own: straight to its kernel.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const StackCall op = c.layer();
    // A step's state gradients in the op's shape, and its gradients back in
    // the step's.
    const auto to_op = [&](const Tensor& g, const Tensor& like) {
      return c.step && g.defined() ? g.reshape(like.sizes()) : g;
    };
    const auto to_step = [&](const Tensor& g, const Tensor& like) {
      return c.step && g.defined() ? g.view(like.sizes()) : g;
    };
    auto [gx, ghx, gcx, gw] = call_backward(
        op, saved[3], saved[4], saved[5], as_optional(grad_output),
        as_optional(to_op(grad_hn, op.hx)), as_optional(c.cx ? to_op(grad_cn, *op.cx) : grad_cn),
        input_grad, state_grad);
    if (input_grad) out[1] = to_step(gx, c.input);
    if (state_grad) {
      out[2] = to_step(ghx, c.hx);
      out[3] = c.cx ? to_step(gcx, *c.cx) : gcx;
    }
    for (size_t i = 0; i < gw.size(); ++i) out[4 + i] = gw[i];
    return out;
  }

  // The gradients through the step-by-step forward: with create_graph=True
  // as differentiable functions of the inputs, so that they can be
  // differentiated again; for batched gradients, because its ATen ops have
  // batching rules.
  static void backward_with_graph(const StackCall& c, const std::array<Tensor, 3>& grads,
                                  variable_list& out) {
    // The recomputation needs a graph; the gradients keep theirs only when
    // one was asked for.
    const bool create_graph = torch::autograd::GradMode::is_enabled();
    torch::autograd::AutoGradMode grad_mode(true);
    const StackCall op = c.layer();  // a step's views, differentiable here
    const StackForward f =
        stack_forward_by_steps(op.check(), op.input, op.hx, op.cx, op.weights, op.lengths, op.mask);
    std::vector<Tensor> inputs = {c.input, c.hx, c.cx.value_or(Tensor())};
    inputs.insert(inputs.end(), c.weights.begin(), c.weights.end());
    std::vector<Tensor> wanted, outputs, grad_outputs;
    for (const Tensor& t : inputs)
      if (t.defined() && t.requires_grad()) wanted.push_back(t);
    const Tensor results[3] = {f.output, f.h_n, f.c_n};
    for (int i = 0; i < 3; ++i) {
      if (grads[i].defined()) {
        outputs.push_back(results[i]);
        grad_outputs.push_back(grads[i].reshape(results[i].sizes()));
      }
    }
    if (wanted.empty() || outputs.empty()) return;
    const auto g = torch::autograd::grad(outputs, wanted, grad_outputs, /*retain_graph=*/true,
                                         create_graph, /*allow_unused=*/true);
    for (size_t i = 0, k = 0; i < inputs.size(); ++i)
      if (inputs[i].defined() && inputs[i].requires_grad()) out[1 + i] = g[k++];
  }
};

// Whether a function transform (torch.func) is active on this thread.
bool transform_active() {
  // functorch keeps its TLS once used; it refuses a C++ autograd Function
  // exactly while a transform is active.
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    try {
      functorch->checkSupportsCppAutogradFunction();
    } catch (const c10::Error&) {
      return true;
    }
  }
  return false;
}

// Whether pred holds for any defined tensor of the lists.
template <typename Pred>
bool any_tensor(std::initializer_list<at::TensorList> lists, const Pred& pred) {
  for (const at::TensorList& list : lists)
    for (const Tensor& t : list)
      if (t.defined() && pred(t)) return true;
  return false;
}
bool has_tangent(const Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }
bool wants_grad(const Tensor& t) { return t.requires_grad(); }

// Whether the call must run step by step in ATen ops: under a function
// transform, or with a forward-mode tangent on any input.
bool needs_steps(const StackCall& c) {
  const at::TensorList cx = c.cx ? at::TensorList(*c.cx) : at::TensorList();
  return transform_active() || any_tensor({c.input, c.hx, cx, c.weights}, has_tangent);
}

bool any_requires_grad(const StackCall& c) {
  const at::TensorList cx = c.cx ? at::TensorList(*c.cx) : at::TensorList();
  return any_tensor({c.input, c.hx, cx, c.weights}, wants_grad);
}

variable_list forward_autograd(const StackCall& c) {
  if (needs_steps(c)) {
    return outputs_of(stack_forward_by_steps(c.check(), c.input, c.hx, c.cx, c.weights,
                                             c.lengths, c.mask));
  }
  if (!torch::autograd::GradMode::is_enabled() || !any_requires_grad(c)) {
    // No graph to record: the op's kernel without an autograd Function.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(c);
  }
  return StackFunction::apply(static_cast<int64_t>(c.cell), c.input, c.hx, c.cx, c.weights,
                              c.lengths, c.mask, c.num_layers, c.bidirectional, c.biases, c.proj,
                              c.step);
}

StackCall stack_call(c10::string_view cell, const Tensor& input, at::TensorList hx,
                     at::TensorList weights, const optional<Tensor>& lengths,
                     const optional<Tensor>& mask, int64_t num_layers, bool bidirectional,
                     bool has_biases, bool has_projections) {
  const CellKind kind = cell_kind(cell);
  check_states(kind, hx);  // before hx[0] is read
  const optional<Tensor> cx = hx.size() == 2 ? optional<Tensor>(hx[1]) : std::nullopt;
  return {kind, input, hx[0], cx, weights, lengths, mask, num_layers, bidirectional, has_biases,
          has_projections};
}

std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> forward_autograd_kernel(
    c10::string_view cell, const Tensor& input, at::TensorList hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, bool has_projections) {
  return unflat(forward_autograd(stack_call(cell, input, hx, weights, lengths, dropout_mask,
                                            num_layers, bidirectional, has_biases,
                                            has_projections)));
}

// Under torch.autocast the layers run in the autocast dtype, as torch.nn's
// do: floating arguments are cast, then the op runs. On CUDA for every cell
// (cuDNN's behaviour); on the CPU for Elman and LSTM, whose torch.nn layers
// return the autocast dtype there, while nn.GRU returns float32.
template <c10::DeviceType kDevice>
struct AutocastCast {
  static constexpr c10::DispatchKey kKey =
      kDevice == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA : c10::DispatchKey::AutocastCPU;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{kKey};
  at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  bool on = true;  // false: arguments pass as they are
  Tensor operator()(const Tensor& t) const {
    return on ? at::autocast::cached_cast(dtype, t, kDevice) : t;
  }
  optional<Tensor> operator()(const optional<Tensor>& t) const {
    return t ? optional<Tensor>((*this)(*t)) : std::nullopt;
  }
  std::vector<Tensor> operator()(at::TensorList ts) const {
    std::vector<Tensor> out;
    out.reserve(ts.size());
    for (const Tensor& t : ts) out.push_back((*this)(t));
    return out;
  }
};

template <c10::DeviceType kDevice>
std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> forward_autocast(
    c10::string_view cell, const Tensor& input, at::TensorList hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, bool has_projections) {
  static auto op = typed_op<decltype(forward)>("fastrnn::forward");
  constexpr bool cpu = kDevice == c10::DeviceType::CPU;
  const CellKind kind = cell_kind(cell);
  AutocastCast<kDevice> cast;
  cast.on = !(cpu && kind == CellKind::gru);
  auto out = op.call(cell, cast(input), cast(hx), cast(weights), lengths, cast(dropout_mask),
                     num_layers, bidirectional, has_biases, has_projections);
  // nn.LSTM with projections under CPU autocast keeps its cell state in
  // float32 (its output and h_n in the autocast dtype).
  auto& state_n = std::get<1>(out);
  if (cpu && has_projections && state_n.size() == 2 && hx.size() == 2 &&
      hx[1].scalar_type() == at::kFloat)
    state_n[1] = state_n[1].to(at::kFloat);
  return out;
}

// Whether t is a plain CPU tensor of the CPU kernels' dtype: dense,
// contiguous, no key but those every CPU tensor has (no subclass, no
// transform's wrapper, no negative bit), no forward-mode tangent.
bool plain_cpu(const Tensor& t, at::ScalarType dtype) {
  static const c10::DispatchKeySet plain{c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                         c10::DispatchKey::ADInplaceOrView,
                                         c10::DispatchKey::AutocastCPU};
  return t.defined() && (t.key_set() | plain) == plain && t.layout() == at::kStrided &&
         t.scalar_type() == dtype && t.is_contiguous() && !has_tangent(t);
}

// H for a forward of one layer, one direction, no projections, that the
// CPU's own kernels can run without the dispatcher (direct_call()); 0 where
// it cannot. It must be outside autocast, dispatch modes, the JIT tracer
// and transforms, on plain CPU tensors of float or double, with input
// (..., C), C > 0, and the cell's weights W_ih (G*H, C), W_hh (G*H, H) and
// with biases b_ih, b_hh (G*H). The caller checks the states' shapes.
int64_t direct_hidden(CellKind cell, const Tensor& input, at::TensorList states,
                      const std::vector<Tensor>& weights, bool has_biases) {
  const at::ScalarType dtype = input.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return 0;
  // The JIT tracer records ops as the dispatcher sees them.
  if (at::autocast::is_autocast_enabled(at::kCPU) || c10::impl::dispatch_mode_enabled() ||
      torch::jit::tracer::isTracing() || transform_active())
    return 0;
  const int64_t C = input.dim() > 0 ? input.size(-1) : 0;
  const int64_t G = with_cell(cell, [](auto c) { return decltype(c)::kGates; });
  if (weights.size() != (has_biases ? 4u : 2u) || C == 0 || !plain_cpu(input, dtype) ||
      !cpu_loop(input))
    return 0;
  const int64_t H = weights[1].dim() == 2 ? weights[1].size(1) : 0;
  if (H == 0 || weights[0].sizes() != at::IntArrayRef({G * H, C}) ||
      weights[1].sizes() != at::IntArrayRef({G * H, H}))
    return 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    if (!plain_cpu(weights[i], dtype)) return 0;
    if (i >= 2 && weights[i].sizes() != at::IntArrayRef({G * H})) return 0;
  }
  for (const Tensor& h : states)
    if (!plain_cpu(h, dtype)) return 0;
  return H;
}

// The forward direct_hidden() allows, on tensors shaped as the time loop
// reads them (x (T, N, C), y (T, N, H), the states h0, c0, hn and cn
// (1, N, H)): the op's kernel on the op's arguments, so the op's bits.
// With `saved` (1, T, N, Ws), the values the backward reads are kept there.
void direct_forward(CellKind cell, const Tensor& x, const Tensor& h0, const Tensor& c0,
                    const std::vector<Tensor>& weights, bool has_biases, const Tensor& y,
                    const Tensor& hn, const Tensor& cn, const Tensor& saved = Tensor()) {
  RECORD_FUNCTION("fastrnn::forward", std::vector<c10::IValue>());
  ForwardLoop a;
  a.x = x;
  a.w_ih[0] = weights[0];
  a.w_hh[0] = weights[1];
  if (has_biases) {
    a.b_ih[0] = weights[2];
    a.b_hh[0] = weights[3];
  }
  a.h0 = h0;
  a.c0 = c0;
  a.y = y;
  a.hn = hn;
  a.cn = cn;
  a.saved = saved;
  forward_recurrence_cpu(cell, a);
}

// g (a gradient of a step's states or a call's output) as a contiguous
// tensor: itself, or for a small strided CPU tensor of float or double of
// up to three dimensions (the expanded ones of a sum's backward) a copy
// made without the dispatcher; ATen's vectorised copy for a larger one.
Tensor dense(const Tensor& g) {
  constexpr int64_t kSmall = 4096;
  if (g.layout() != at::kStrided || g.is_contiguous()) return g.contiguous();
  const at::ScalarType dtype = g.scalar_type();
  if (!g.is_cpu() || g.dim() > 3 || g.numel() > kSmall ||
      (dtype != at::kFloat && dtype != at::kDouble))
    return g.contiguous();
  Tensor out = at::detail::empty_cpu(g.sizes(), dtype);
  // As (A, B, K), a missing leading dimension of size 1.
  int64_t size[3] = {1, 1, 1}, stride[3] = {0, 0, 0};
  for (int64_t i = 0, k = 3 - g.dim(); i < g.dim(); ++i, ++k) {
    size[k] = g.size(i);
    stride[k] = g.stride(i);
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastrnn_dense", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t a = 0; a < size[0]; ++a)
      for (int64_t b = 0; b < size[1]; ++b)
        for (int64_t k = 0; k < size[2]; ++k)
          *dst++ = src[a * stride[0] + b * stride[1] + k * stride[2]];
  });
  return out;
}

// A new autograd node of type N as the installed torch holds nodes: in an
// intrusive_ptr (torch 2.13 on), or in a shared_ptr whose deleter is
// autograd's deleteNode (found by argument-dependent lookup), which frees a
// long chain of nodes without recursing down it.
template <typename N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>();
  } else {
    return std::shared_ptr<N>(new N(), [](N* node) { deleteNode(node); });
  }
}

// torch.autograd.graph's node-creation hooks, on a torch that has them
// (fire_node_creation_hooks, found by argument-dependent lookup).
template <typename P, typename = void>
struct HasCreationHooks : std::false_type {};
template <typename P>
struct HasCreationHooks<P, std::void_t<decltype(fire_node_creation_hooks(std::declval<const P&>()))>>
    : std::true_type {};

template <typename P>
void node_created(const P& node) {
  if constexpr (HasCreationHooks<P>::value) fire_node_creation_hooks(node);
}

// The autograd node of an eager call of one layer and direction, no
// projections, on the CPU's own kernels: a cell's step (direct_step) or a
// layer's plainest call (layer_forward). Its backward is the backward op's
// (stack_backward) without an autograd Function's context, the
// dispatcher, the op's argument checks and the views around a step. Its
// edges: the input, h (and c), then the weights; its inputs: a step's new
// states, or a layer's output and final states. A graph of the gradients
// (double backward) or batched gradients go where StackFunction's do.
struct FusedBackward final : torch::autograd::Node {
  using SavedVariable = torch::autograd::SavedVariable;
  Stack s;            // the call as one layer (a step: T = 1)
  bool step = false;  // a cell's step: input (N, C) or (C), states (N, H) or (H)
  int64_t width = 1;  // states: h, or h and c
  SavedVariable input, h, c, output;
  std::vector<SavedVariable> weights;
  SavedVariable workspace;  // (1, 1, T, N, Ws)

  std::string name() const override { return "fastrnn::FusedBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&input, &h, &c, &output, &workspace}) v->reset_data();
    for (SavedVariable& w : weights) w.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const Tensor x = input.unpack();
    const Tensor h0 = h.unpack();
    const Tensor c0 = width == 2 ? c.unpack() : Tensor();
    std::vector<Tensor> w;
    w.reserve(weights.size());
    for (const SavedVariable& v : weights) w.push_back(v.unpack());
    // The gradients of the output (a layer's), h_n and c_n.
    const Tensor dy = step ? Tensor() : grads[0];
    const Tensor dh = grads[step ? 0 : 1];
    const Tensor dc = width == 2 ? grads[step ? 1 : 2] : Tensor();
    variable_list out(num_outputs());
    if (!dy.defined() && !dh.defined() && !dc.defined()) return out;
    if (torch::autograd::GradMode::is_enabled() || at::isBatchedTensor(dy) ||
        at::isBatchedTensor(dh) || at::isBatchedTensor(dc)) {
      const StackCall call{s.cell, x, h0, width == 2 ? optional<Tensor>(c0) : std::nullopt, w,
                           std::nullopt, std::nullopt, 1, false, s.biases, false, step};
      variable_list all(1 + 3 + w.size() + 7);
      StackFunction::backward_with_graph(call, {dy, dh, dc}, all);
      out[0] = all[1];
      for (int64_t i = 0; i < width; ++i) out[1 + i] = all[2 + i];
      for (size_t i = 0; i < w.size(); ++i) out[1 + width + i] = all[4 + i];
      return out;
    }
    const bool input_grad = task_should_compute_output(0);
    const bool state_grad =
        task_should_compute_output(1) || (width == 2 && task_should_compute_output(2));
    // As torch.nn's autograd, no weight's gradient where none is asked for
    // (frozen weights, a gradient of the input alone).
    bool weight_grad = false;
    for (size_t i = 0; i < w.size(); ++i) weight_grad |= task_should_compute_output(1 + width + i);
    RECORD_FUNCTION("fastrnn::backward", std::vector<c10::IValue>());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t T = s.T, N = s.N, H = s.H;
    // A step's tensors as one step of a layer; a layer's as they are.
    const auto layer = [&](const Tensor& t, int64_t rows, int64_t size) {
      return step ? shaped(t, {rows, N, size}) : t;
    };
    const auto grad = [&](const Tensor& g, int64_t rows) {
      return g.defined() ? optional<Tensor>(layer(dense(g), rows, H)) : std::nullopt;
    };
    const StackBackward b = stack_backward(
        s, layer(x, T, s.C), layer(h0, 1, H),
        width == 2 ? optional<Tensor>(layer(c0, 1, H)) : std::nullopt, w, std::nullopt,
        std::nullopt, layer(output.unpack(), T, H), Tensor(),
        s.Ws > 0 ? workspace.unpack() : Tensor(),
        grad(dy, T), grad(dh, 1), grad(dc, 1), input_grad, state_grad, weight_grad);
    const auto back = [&](const Tensor& g, const Tensor& like) {
      return step ? shaped(g, like.sizes()) : g;
    };
    if (input_grad) out[0] = back(b.grad_input, x);
    if (state_grad) {
      out[1] = back(b.grad_hx, h0);
      if (width == 2) out[2] = back(b.grad_cx, c0);
    }
    for (size_t i = 0; i < b.grad_weights.size(); ++i) out[1 + width + i] = b.grad_weights[i];
    return out;
  }
};

// The forward of a FusedBackward's call on x (T, N, C), the states h0 (and
// c0) (1, N, H) and the weights, into y (T, N, H) and hn (and cn) (1, N,
// H) (y and hn may share memory), and the node: its edges from the
// caller's tensors (input, states), its inputs from `outputs` (the tensors
// returned, each a fresh one of the caller's), and its saved tensors.
// Nothing is recorded until the kernel has run.
void record_fused(CellKind cell, bool step, const Tensor& input, const Tensor& x,
                  const std::array<Tensor, 2>& states, const std::array<Tensor, 2>& h3,
                  int64_t width, const std::vector<Tensor>& weights, bool has_biases,
                  const Tensor& y, const Tensor& hn, const Tensor& cn,
                  std::vector<Tensor>& outputs) {
  auto node = make_node<FusedBackward>();
  node->s = check_args(cell, x, at::TensorList(h3.data(), width), weights, std::nullopt,
                       std::nullopt, 1, false, has_biases, false);
  node->step = step;
  node->width = width;
  const int64_t T = node->s.T, N = node->s.N, Ws = node->s.Ws;
  // A cell that keeps nothing for the backward (Elman's) has no workspace.
  const Tensor ws = Ws > 0 ? recycled({1, 1, T, N, Ws}, x.options()) : Tensor();
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    direct_forward(cell, x, h3[0], h3[1], weights, has_biases, y, hn, cn,
                   Ws > 0 ? shaped(ws, {1, T, N, Ws}) : Tensor());
  }
  node->set_next_edges(
      width == 2 ? torch::autograd::collect_next_edges(input, states[0], states[1], weights)
                 : torch::autograd::collect_next_edges(input, states[0], weights));
  for (Tensor& t : outputs) torch::autograd::create_gradient_edge(t, node);
  using torch::autograd::SavedVariable;
  node->input = SavedVariable(input, false);
  node->h = SavedVariable(states[0], false);
  if (width == 2) node->c = SavedVariable(states[1], false);
  node->weights.reserve(weights.size());
  for (const Tensor& w : weights) node->weights.emplace_back(w, false);
  // The output as an alias without its grad_fn that shares its version
  // counter: written in place after the call, it fails the backward as
  // an output saved as one would, and unpacking it makes no new variable.
  Tensor output = shaped(outputs[0], outputs[0].sizes());
  output.unsafeGetTensorImpl()->set_version_counter(
      outputs[0].unsafeGetTensorImpl()->version_counter());
  node->output = SavedVariable(output, false);
  if (Ws > 0) node->workspace = SavedVariable(ws, false);
  const decltype(node->getptr()) base = node;
  node_created(base);
}

// The forward of a call direct_hidden() allows, into y, hn (and cn) (see
// record_fused): where a backward can follow (grad mode, and a tensor
// requiring grad) with a FusedBackward recorded for it, else the kernel
// alone (direct_forward()).
void direct_call(CellKind cell, bool step, const Tensor& input, const Tensor& x,
                 const std::array<Tensor, 2>& states, const std::array<Tensor, 2>& h3,
                 int64_t width, const std::vector<Tensor>& weights, bool has_biases,
                 const Tensor& y, const Tensor& hn, const Tensor& cn,
                 std::vector<Tensor>& outputs) {
  if (torch::autograd::GradMode::is_enabled() &&
      any_tensor({input, at::TensorList(states.data(), width), weights}, wants_grad)) {
    record_fused(cell, step, input, x, states, h3, width, weights, has_biases, y, hn, cn,
                 outputs);
  } else {
    direct_forward(cell, x, h3[0], h3[1], weights, has_biases, y, hn, cn);
  }
}

// A cell's eager step on the CPU's own kernels (direct_call()): without the
// op's dispatch, views and the outputs a step does not return (its output
// is h_n, the hidden states, the workspace). Nothing where the step is any
// other: the op then runs it, with every check and error.
std::optional<std::vector<Tensor>> direct_step(CellKind cell, const Tensor& input,
                                               const std::array<Tensor, 2>& h, int64_t width,
                                               const std::vector<Tensor>& weights,
                                               bool has_biases) {
  const at::TensorList states(h.data(), width);
  const int64_t H = direct_hidden(cell, input, states, weights, has_biases);
  const bool batched = input.dim() == 2;
  const int64_t N = batched ? input.size(0) : 1;
  if (H == 0 || N == 0) return std::nullopt;
  for (const Tensor& t : states)
    if (t.dim() != input.dim() || t.size(0) != (batched ? N : H) || t.size(-1) != H)
      return std::nullopt;
  const std::array<Tensor, 2> h3 = {shaped(h[0], {1, N, H}),
                                    width == 2 ? shaped(h[1], {1, N, H}) : Tensor()};
  std::vector<Tensor> out;
  for (const Tensor& t : states)
    out.emplace_back(at::detail::empty_cpu(t.sizes(), t.scalar_type()));
  // One step's output is its last state: the loop writes both, the same
  // values, to the same memory.
  const Tensor hn = shaped(out[0], {1, N, H});
  direct_call(cell, /*step=*/true, input, shaped(input, {1, N, input.size(-1)}), h, h3, width,
              weights, has_biases, hn, hn, width == 2 ? shaped(out[1], {1, N, H}) : Tensor(),
              out);
  return out;
}

}  // namespace

std::vector<Tensor> cell_step(c10::string_view name, const Tensor& input,
                              const std::vector<Tensor>& states,
                              const std::vector<Tensor>& weights, bool has_biases) {
  const CellKind cell = cell_kind(name);
  const bool batched = input.dim() == 2;
  TORCH_CHECK(input.dim() == 1 || batched, "cell_step: input must be 1-D or 2-D");
  TORCH_CHECK(weights.size() >= 2, "cell_step: weights must hold weight_ih and weight_hh");
  const int64_t width = cell_states(cell);
  TORCH_CHECK(states.empty() || static_cast<int64_t>(states.size()) == width,
              "cell_step: expected ", width, " states, got ", states.size());
  std::array<Tensor, 2> h;
  for (int64_t i = 0; i < width; ++i) {
    const int64_t hidden = weights[1].size(1);
    h[i] = !states.empty() ? states[i]
           : batched       ? at::zeros({input.size(0), hidden}, input.options())
                           : at::zeros({hidden}, input.options());
  }
  if (auto out = direct_step(cell, input, h, width, weights, has_biases)) return std::move(*out);
  const StackCall c{cell, input, h[0], width == 2 ? optional<Tensor>(h[1]) : std::nullopt,
                    weights, std::nullopt, std::nullopt, 1, false, has_biases, false, true};
  const bool grad = torch::autograd::GradMode::is_enabled();
  // An eager step without grad mode has no backward to keep values for.
  const KeepWorkspace keep(grad);
  if (grad && any_requires_grad(c) && !needs_steps(c) &&
      !at::autocast::is_autocast_enabled(input.device().type())) {
    // The autograd Function with the step's views inside it: no view nodes
    // in the graph, no dispatch to the op's autograd kernel.
    variable_list out = StackFunction::apply(static_cast<int64_t>(cell), c.input, c.hx, c.cx,
                                             c.weights, c.lengths, c.mask, c.num_layers,
                                             c.bidirectional, c.biases, c.proj, true);
    return {out.begin() + 1, out.begin() + 1 + width};
  }
  // Otherwise the op through the dispatcher (autocast, function transforms),
  // its (1, N, H) states viewed back; a view's backward is a view again (a
  // select's would allocate and fill a zero tensor of the whole).
  const variable_list out = call_forward(c.layer());
  auto state = [&](const Tensor& t) { return t.view(c.hx.sizes()); };
  if (width == 2) return {state(out[1]), state(out[2])};
  return {state(out[1])};
}

std::vector<Tensor> layer_forward(c10::string_view name, const Tensor& input,
                                  const std::vector<Tensor>& states,
                                  const std::vector<Tensor>& weights, int64_t input_size,
                                  int64_t hidden_size, int64_t proj_size, int64_t num_layers,
                                  bool bidirectional, bool has_biases, bool batch_first) {
  const CellKind cell = cell_kind(name);
  if (input.dim() != 3) return {};
  const Tensor x = batch_first ? input.transpose(0, 1) : input;
  const int64_t T = x.size(0), N = x.size(1), width = cell_states(cell);
  if (T == 0 || x.size(2) != input_size) return {};
  const int64_t LD = num_layers * (bidirectional ? 2 : 1);
  const int64_t P = proj_size > 0 ? proj_size : hidden_size;
  const auto same = [&](const Tensor& t) {
    return t.scalar_type() == x.scalar_type() && t.device() == x.device();
  };
  std::vector<Tensor> hx;
  if (states.empty()) {
    hx.push_back(at::zeros({LD, N, P}, x.options()));
    if (width == 2) hx.push_back(at::zeros({LD, N, hidden_size}, x.options()));
  } else {
    if (static_cast<int64_t>(states.size()) != width) return {};
    for (int64_t i = 0; i < width; ++i) {
      const Tensor& h = states[i];
      if (!same(h) || h.sizes() != at::IntArrayRef({LD, N, i == 0 ? P : hidden_size})) return {};
    }
    hx = states;
  }
  for (const Tensor& w : weights)
    if (!same(w)) return {};
  if (num_layers == 1 && !bidirectional && proj_size == 0 && N > 0 &&
      direct_hidden(cell, x, hx, weights, has_biases) == hidden_size) {
    // A call of one layer and direction (a stream's step) on the CPU
    // kernels without the op's dispatch and outputs (direct_call()).
    std::vector<Tensor> out = {recycled({T, N, hidden_size}, x.options())};
    for (int64_t i = 0; i < width; ++i) out.push_back(buffer({1, N, hidden_size}, x.options()));
    const std::array<Tensor, 2> states = {hx[0], width == 2 ? hx[1] : Tensor()};
    direct_call(cell, /*step=*/false, x, x, states, states, width, weights, has_biases, out[0],
                out[1], width == 2 ? out[2] : Tensor(), out);
    if (batch_first) out[0] = out[0].transpose(0, 1);
    return out;
  }
  const KeepWorkspace keep(torch::autograd::GradMode::is_enabled());
  variable_list out;
  try {
    out = call_forward({cell, x, hx[0], width == 2 ? optional<Tensor>(hx[1]) : std::nullopt,
                        weights, std::nullopt, std::nullopt, num_layers, bidirectional,
                        has_biases, proj_size > 0});
  } catch (const c10::Error&) {
    return {};  // the caller's full argument handling raises torch.nn's error
  }
  out[0] = batch_first ? out[0].transpose(0, 1) : out[0];
  out.resize(1 + width);  // output, h_n[, c_n]
  return out;
}

TORCH_LIBRARY_IMPL(fastrnn, Autograd, m) { m.impl("forward", &forward_autograd_kernel); }

TORCH_LIBRARY_IMPL(fastrnn, AutocastCUDA, m) {
  m.impl("forward", &forward_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(fastrnn, AutocastCPU, m) {
  m.impl("forward", &forward_autocast<c10::DeviceType::CPU>);
}

}  // namespace fastrnn
