// See rnn_args.h.
#include "rnn_args.h"

#include <c10/util/Exception.h>

#include <sstream>

#include "recurrence_params.h"

namespace fastrnn {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

std::string weight_name(const char* kind, int64_t l, int64_t d) {
  return std::string(kind) + "_l" + std::to_string(l) + (d ? "_reverse" : "");
}

void check_weight(const at::Tensor& w, const char* kind, int64_t l, int64_t d, const char* letters,
                  at::IntArrayRef expected, const at::Tensor& input) {
  // The name is built only for a message: this runs for every weight of
  // every call.
  if (w.sizes() == expected && w.device() == input.device() &&
      w.scalar_type() == input.scalar_type())
    return;
  const std::string name = weight_name(kind, l, d);
  check_shape(w, name, letters, expected);
  check_like(w, name, input);
}

}  // namespace

CellKind cell_kind(c10::string_view name) {
  for (CellKind k : kCellKinds)
    if (name == cell_name(k)) return k;
  TORCH_CHECK(false, "unknown cell '", std::string(name.data(), name.size()),
              "': expected rnn_tanh, rnn_relu, lstm or gru");
}

const char* cell_name(CellKind cell) {
  return with_cell(cell, [](auto c) { return decltype(c)::kName; });
}

int64_t cell_states(CellKind cell) {
  return with_cell(cell, [](auto c) { return decltype(c)::kCellState ? 2 : 1; });
}

void check_states(CellKind cell, at::TensorList hx) {
  const int64_t states = cell_states(cell);
  TORCH_CHECK(static_cast<int64_t>(hx.size()) == states, "hx must hold ",
              states == 2 ? "2 states (h, c)" : "1 state (h)", " for ", cell_name(cell), ", got ",
              hx.size());
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_shape(const at::Tensor& t, const std::string& name, const char* letters,
                 at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", letters, " = ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
}

void check_like(const at::Tensor& t, const std::string& name, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), name, " must be on the input's device ",
              input.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
              input.scalar_type(), ", got ", t.scalar_type());
}

int64_t first_weight(const Stack& s, int64_t l, int64_t d) { return (l * s.D + d) * s.per_cell(); }

CellWeights cell_weights(at::TensorList w, const Stack& s, int64_t l, int64_t d) {
  const int64_t k = first_weight(s, l, d);
  CellWeights c;
  c.w_ih = w[k];
  c.w_hh = w[k + 1];
  if (s.biases) {
    c.b_ih = w[k + 2];
    c.b_hh = w[k + 3];
  }
  if (s.proj) c.w_hr = w[k + (s.biases ? 4 : 2)];
  return c;
}

Stack check_args(CellKind cell, const at::Tensor& input, at::TensorList states,
                 at::TensorList weights,
                 const std::optional<at::Tensor>& lengths,
                 const std::optional<at::Tensor>& dropout_mask, int64_t num_layers,
                 bool bidirectional, bool has_biases, bool has_projections) {
  TORCH_CHECK(input.dim() == 3, "input must have shape (T, N, C), got ", shape_str(input.sizes()));
  TORCH_CHECK(input.is_cpu() || input.is_cuda(),
              "fastrnn supports CPU and CUDA tensors, got input on ", input.device());
  TORCH_CHECK(supported_dtype(input.scalar_type()),
              "fastrnn supports float32, float64, float16 and bfloat16 input, got ",
              input.scalar_type());
  TORCH_CHECK(num_layers >= 1, "num_layers must be at least 1, got ", num_layers);
  Stack s;
  s.cell = cell;
  bool projectable = false;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    s.G = Cell::kGates;
    s.cell_state = Cell::kCellState;
    s.hidden_bias = Cell::kHiddenBias;
    projectable = Cell::kProjections;
  });
  const bool lstm = s.cell_state;
  TORCH_CHECK(projectable || !has_projections, "projections apply to LSTM only");
  check_states(cell, states);
  const at::Tensor& hx = states[0];
  const at::Tensor* cx = lstm ? &states[1] : nullptr;
  s.T = input.size(0);
  s.N = input.size(1);
  s.C = input.size(2);
  s.L = num_layers;
  s.D = bidirectional ? 2 : 1;
  s.biases = has_biases;
  s.proj = has_projections;
  const int64_t expected = s.L * s.D * s.per_cell();
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == expected, "weights must hold ", expected,
              " tensors for ", s.L, " layer(s) and ", s.D, " direction(s) ",
              has_biases ? "with" : "without", " biases",
              lstm ? (has_projections ? " and with projections" : " and without projections") : "",
              ", got ", weights.size());
  TORCH_CHECK(hx.dim() == 3, "hx must have shape (L*D, N, ", lstm ? "P" : "H", "), got ",
              shape_str(hx.sizes()));
  s.P = hx.size(2);
  if (lstm) {
    // H from the first weight (which the other shapes are checked against),
    // P from hx.
    const at::Tensor& w_ih = weights[0];
    TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % s.G == 0, "weight_ih_l0 must have shape (G*H, C) ",
                "with G = ", s.G, ", got ", shape_str(w_ih.sizes()));
    s.H = w_ih.size(0) / s.G;
    TORCH_CHECK(cx->dim() == 3, "cx must have shape (L*D, N, H), got ", shape_str(cx->sizes()));
    check_shape(*cx, "cx", "(L*D, N, H)", {s.L * s.D, s.N, s.H});
    check_like(*cx, "cx", input);
    if (has_projections) {
      TORCH_CHECK(s.P < s.H, "with projections the width of hx (P = ", s.P,
                  ") must be smaller than that of cx (H = ", s.H, ")");
      check_shape(hx, "hx", "(L*D, N, P)", {s.L * s.D, s.N, s.P});
    } else {
      check_shape(hx, "hx", "(L*D, N, H)", {s.L * s.D, s.N, s.H});
    }
  } else {
    s.H = s.P;
    check_shape(hx, "hx", "(L*D, N, H)", {s.L * s.D, s.N, s.H});
  }
  check_like(hx, "hx", input);
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    s.Ws = saved_width<Cell>(s.H);
  });
  const int64_t GH = s.G * s.H;
  for (int64_t l = 0; l < s.L; ++l) {
    for (int64_t d = 0; d < s.D; ++d) {
      const CellWeights w = cell_weights(weights, s, l, d);
      check_weight(w.w_ih, "weight_ih", l, d, l == 0 ? "(G*H, C)" : "(G*H, D*P)",
                   {GH, s.in_size(l)}, input);
      check_weight(w.w_hh, "weight_hh", l, d, "(G*H, P)", {GH, s.P}, input);
      if (has_biases) {
        check_weight(w.b_ih, "bias_ih", l, d, "(G*H,)", {GH}, input);
        check_weight(w.b_hh, "bias_hh", l, d, "(G*H,)", {GH}, input);
      }
      if (has_projections) check_weight(w.w_hr, "weight_hr", l, d, "(P, H)", {s.P, s.H}, input);
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
    check_shape(*dropout_mask, "dropout_mask", "(L-1, T, N, D*P)",
                {s.L - 1, s.T, s.N, s.DP()});
    check_like(*dropout_mask, "dropout_mask", input);
  }
  return s;
}

}  // namespace fastrnn
