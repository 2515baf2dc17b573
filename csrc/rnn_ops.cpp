// The op schemas, the ops' CPU and CUDA kernels (the stack of rnn_stack.cpp
// behind named checks), and the Python module that loading registers them
// with.
#include "rnn_ops.h"

#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <map>
#include <string>

#include "recurrence.h"
#include "recurrence_params.h"
#include "rnn_args.h"
#include "rnn_stack.h"

namespace fastrnn {
namespace {

// The tensors a backward op takes besides the forward's arguments: what the
// forward returned and the gradients of its outputs.
void check_backward_tensors(const Stack& s, const Tensor& input, const Tensor& output,
                            const Tensor& hidden_states, const Tensor& workspace,
                            const optional<Tensor>& grad_output, const optional<Tensor>& grad_hn,
                            const optional<Tensor>& grad_cn) {
  check_shape(output, "output", "(T, N, D*P)", {s.T, s.N, s.DP()});
  check_like(output, "output", input);
  check_shape(hidden_states, "hidden_states", "(L-1, T, N, D*P)", {s.L - 1, s.T, s.N, s.DP()});
  check_like(hidden_states, "hidden_states", input);
  check_shape(workspace, "workspace", "(L, D, T, N, Ws)", {s.L, s.D, s.T, s.N, s.Ws});
  check_like(workspace, "workspace", input);
  if (grad_output) {
    check_shape(*grad_output, "grad_output", "(T, N, D*P)", {s.T, s.N, s.DP()});
    check_like(*grad_output, "grad_output", input);
  }
  if (grad_hn) {
    check_shape(*grad_hn, "grad_hn", "(L*D, N, P)", {s.L * s.D, s.N, s.P});
    check_like(*grad_hn, "grad_hn", input);
  }
  if (grad_cn) {
    check_shape(*grad_cn, "grad_cn", "(L*D, N, H)", {s.L * s.D, s.N, s.H});
    check_like(*grad_cn, "grad_cn", input);
  }
}

optional<Tensor> state(at::TensorList hx, size_t i) {
  return i < hx.size() ? optional<Tensor>(hx[i]) : std::nullopt;
}

}  // namespace

std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor> forward(
    c10::string_view cell, const Tensor& input, at::TensorList hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, int64_t num_layers,
    bool bidirectional, bool has_biases, bool has_projections) {
  const Stack s = check_args(cell_kind(cell), input, hx, weights, lengths, dropout_mask,
                             num_layers, bidirectional, has_biases, has_projections);
  StackForward f = stack_forward(s, input, hx[0], state(hx, 1), weights, lengths, dropout_mask);
  std::vector<Tensor> state_n = {f.h_n};
  if (s.cell_state) state_n.push_back(f.c_n);
  return {f.output, std::move(state_n), f.hidden_states, f.workspace};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> backward(
    c10::string_view cell, const Tensor& input, at::TensorList hx, at::TensorList weights,
    const optional<Tensor>& lengths, const optional<Tensor>& dropout_mask, const Tensor& output,
    const Tensor& hidden_states, const Tensor& workspace, const optional<Tensor>& grad_output,
    const c10::List<optional<Tensor>>& grad_state_n, int64_t num_layers, bool bidirectional,
    bool has_biases, bool has_projections, bool input_grad, bool state_grad) {
  const Stack s = check_args(cell_kind(cell), input, hx, weights, lengths, dropout_mask,
                             num_layers, bidirectional, has_biases, has_projections);
  TORCH_CHECK(static_cast<int64_t>(grad_state_n.size()) == static_cast<int64_t>(hx.size()),
              "grad_state_n must hold one gradient (or None) per state, ", hx.size(), ", got ",
              grad_state_n.size());
  const optional<Tensor> grad_hn = grad_state_n.get(0);
  const optional<Tensor> grad_cn = s.cell_state ? grad_state_n.get(1) : std::nullopt;
  check_backward_tensors(s, input, output, hidden_states, workspace, grad_output, grad_hn,
                         grad_cn);
  StackBackward b = stack_backward(s, input, hx[0], state(hx, 1), weights, lengths, dropout_mask,
                                   output, hidden_states, workspace, grad_output, grad_hn,
                                   grad_cn, input_grad, state_grad);
  std::vector<Tensor> grad_hx = {b.grad_hx};
  if (s.cell_state) grad_hx.push_back(b.grad_cx);
  return {b.grad_input, std::move(grad_hx), std::move(b.grad_weights)};
}

TORCH_LIBRARY(fastrnn, m) {
  m.def(
      "forward(str cell, Tensor input, Tensor[] hx, Tensor[] weights, Tensor? lengths, "
      "Tensor? dropout_mask, int num_layers, bool bidirectional, bool has_biases, "
      "bool has_projections=False) "
      "-> (Tensor output, Tensor[] state_n, Tensor hidden_states, Tensor workspace)");
  m.def(
      "backward(str cell, Tensor input, Tensor[] hx, Tensor[] weights, Tensor? lengths, "
      "Tensor? dropout_mask, Tensor output, Tensor hidden_states, Tensor workspace, "
      "Tensor? grad_output, Tensor?[] grad_state_n, int num_layers, bool bidirectional, "
      "bool has_biases, bool has_projections=False, bool input_grad=True, bool state_grad=True) "
      "-> (Tensor grad_input, Tensor[] grad_hx, Tensor[] grad_weights)");
}

// The same kernels serve CPU and CUDA tensors: only the time loop differs,
// and recurrence.h picks it.
#define FASTRNN_REGISTER_KERNELS(m) \
  m.impl("forward", &forward);      \
  m.impl("backward", &backward);

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) { FASTRNN_REGISTER_KERNELS(m) }

#ifdef FASTRNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) { FASTRNN_REGISTER_KERNELS(m) }
#endif

}  // namespace fastrnn

#ifdef FASTRNN_WITH_CUDA
#include "cuda/recurrence_cuda.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn's fused recurrences; the ops are torch.ops.fastrnn.*";
#ifdef FASTRNN_WITH_CUDA
  m.attr("cuda_built") = true;
  m.def("set_cuda_path", &fastrnn::set_cuda_path, pybind11::arg("name"), pybind11::arg("blocks") = 0,
        "Force the CUDA time loop's path: 'auto', 'persistent', 'cluster', 'grid' or 'step', "
        "and for 'cluster' and 'grid' the blocks per cluster or group (0: chosen per call)");
  m.def("cuda_path", &fastrnn::cuda_path, "The forced CUDA path and blocks: (name, blocks)");
  m.def("last_cuda_path", &fastrnn::last_cuda_path,
        "The path the last CUDA time loop on this thread took");
  m.def("last_cuda_backward_path", &fastrnn::last_cuda_backward_path,
        "The path the last CUDA backward time loop took, on any thread");
  m.def("set_cuda_emulation", &fastrnn::set_cuda_emulation,
        "Run the CUDA kernels on CPU threads for CPU tensors (tests only)");
  m.def("cuda_emulation", &fastrnn::cuda_emulation, "Whether CUDA emulation is on");
  m.def("set_grid_timeout_ms", &fastrnn::set_grid_timeout_ms,
        "How long a grid-path barrier waits before its launch fails, in milliseconds");
  m.def("set_emulator_blocks", &fastrnn::set_emulator_blocks,
        "Blocks the emulator runs at once on the grid path, 0 for its default (tests only)");
  m.def("choose_emulated_launch", &fastrnn::choose_emulated_launch,
        "The CUDA launch chosen for a call on the emulated H100/H200 (tests only)");
#else
  m.attr("cuda_built") = false;
#endif
  m.def("cell_step", &fastrnn::cell_step, pybind11::arg("cell"), pybind11::arg("input"),
        pybind11::arg("states"), pybind11::arg("weights"), pybind11::arg("has_biases"),
        "One step of a cell: (N, C) or (C) input and states (none for zeros) through the "
        "layer's forward op; the new states as the input came (fastrnn's cells, eager)");
  m.def("layer_forward", &fastrnn::layer_forward, pybind11::arg("cell"), pybind11::arg("input"),
        pybind11::arg("states"), pybind11::arg("weights"), pybind11::arg("input_size"),
        pybind11::arg("hidden_size"), pybind11::arg("proj_size"), pybind11::arg("num_layers"),
        pybind11::arg("bidirectional"), pybind11::arg("has_biases"), pybind11::arg("batch_first"),
        "A layer's plainest eager forward: [output, h_n(, c_n)], or [] for the full "
        "argument handling (fastrnn's layers, eager)");
  m.def(
      "cells",
      [] {
        std::map<std::string, std::tuple<int64_t, int64_t, int64_t>> out;
        for (auto k : fastrnn::kCellKinds)
          fastrnn::with_cell(k, [&](auto c) {
            using Cell = decltype(c);
            out[Cell::kName] = {Cell::kGates, fastrnn::cell_states(k),
                                fastrnn::saved_width<Cell>(1)};
          });
        return out;
      },
      "Each cell the ops take, by name: (gates, states, values a step keeps per hidden unit)");
  m.def("set_keep_workspace", &fastrnn::set_keep_workspace, pybind11::arg("keep"),
        "Whether the forward keeps its workspace for a backward on this thread; returns the "
        "previous setting (the layers' eager calls without grad turn it off)");
  m.def("recycled_bytes", &fastrnn::recycled_bytes,
        "Bytes of the CPU buffers' cache of freed blocks: (cached, live, most ever live at once)");
  m.def("release_recycled", &fastrnn::release_recycled,
        "Free the CPU buffers' cached blocks; the most ever live starts again from the live ones");
  m.def("cpu_isa", &fastrnn::cpu_isa, "The instruction set the CPU kernels run with");
  m.def("cpu_fma_rate", &fastrnn::cpu_fma_rate, pybind11::arg("seconds") = 0.1,
        pybind11::arg("threads") = 1, pybind11::arg("trials") = 3,
        "Lane multiply-adds a second of float32 FMAs on `threads` threads, with the kernels' "
        "instruction set (best of `trials`)");
  m.def("set_cpu_packing", &fastrnn::set_cpu_packing,
        "Whether the CPU time loops pack the weights: 'auto' (where the call's rows times steps "
        "repay it), 'always' or 'never' (tests and benchmarks)");
  m.def("cpu_packing", &fastrnn::cpu_packing, "The CPU time loops' packing: auto, always, never");
  m.def("set_cpu_tiles", &fastrnn::set_cpu_tiles,
        "Whether bfloat16 calls run their steps' products in bfloat16 (AMX tiles or "
        "AVX512-BF16) where they can: 'auto' or 'never'");
  m.def("cpu_tiles", &fastrnn::cpu_tiles, "The bfloat16 tiles' setting: auto or never");
  m.def("tile_matmul", &fastrnn::tile_matmul, pybind11::arg("a"), pybind11::arg("w"),
        pybind11::arg("c") = pybind11::none(),
        "a w on the bfloat16 products alone (AMX tiles or AVX512-BF16; a and w rounded to "
        "bfloat16, float32 sums), or c + that: the backward's carry product, for the tests");
  m.def("cpu_tiles_available", &fastrnn::cpu_tiles_available,
        "Whether this processor runs bfloat16 products in bfloat16 (AMX tiles or AVX512-BF16, "
        "with the AVX-512 kernels)");
  m.def("cpu_tiles_unit", &fastrnn::cpu_tiles_unit,
        "What runs bfloat16 products here: amx, avx512_bf16 or none");
  m.def("set_cpu_isa", &fastrnn::set_cpu_isa,
        "Force the CPU kernels' instruction set ('avx512', 'avx2', 'base' or 'auto'); "
        "returns False when this processor lacks it");
}
