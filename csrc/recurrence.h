// The device-specific time loop of one layer, all directions at once, as
// the stack (rnn_stack.cpp) calls it. Arguments are validated there; each
// implementation only checks what its own kernel assumes. Shapes use the
// letters of recurrence_params.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>

#include "cells.h"

namespace fastrnn {

// One layer's forward time loop: reads x, the weights, h0 (and c0), writes
// y, hn (and cn, saved). Every tensor contiguous, of the input's dtype. The
// stack gives x and W_ih; the CUDA loops get u = x W_ih^T computed by
// input_term() first, the CPU kernels compute it in their recurrent GEMM.
struct ForwardLoop {
  at::Tensor x;                      // (T, N, C) the layer's input
  std::array<at::Tensor, 2> w_ih;    // per direction (G*H, C)
  at::Tensor u;                      // (D, T, N, G*H) x W_ih^T, biases not added; or undefined
  std::array<at::Tensor, 2> w_hh;    // per direction (G*H, P)
  std::array<at::Tensor, 2> b_ih;    // per direction (G*H), or undefined without biases
  std::array<at::Tensor, 2> b_hh;    // per direction (G*H), or undefined without biases
  std::array<at::Tensor, 2> w_hr;    // per direction (P, H): projections, else undefined
  at::Tensor h0;                     // (D, N, P)
  at::Tensor c0;                     // (D, N, H): kCellState cells, else undefined
  std::optional<at::Tensor> lengths;  // (N) int64
  at::Tensor y;                      // (T, N, D*P), out
  at::Tensor hn;                     // (D, N, P), out
  at::Tensor cn;                     // (D, N, H), out: kCellState cells
  at::Tensor saved;                  // (D, T, N, Ws), out: cells that keep something
};

// One layer's backward time loop: from dy (and dhn, dcn) and what the
// forward kept, writes dgh (and dgi, dhr), dh0 (and dc0).
struct BackwardLoop {
  at::Tensor dy;                     // (T, N, D*P)
  std::optional<at::Tensor> dhn;     // (D, N, P) or none for zero
  std::optional<at::Tensor> dcn;     // (D, N, H) or none for zero
  at::Tensor y;                      // (T, N, D*P)
  at::Tensor h0;                     // (D, N, P)
  at::Tensor c0;                     // (D, N, H): kCellState cells
  at::Tensor saved;                  // (D, T, N, Ws) or undefined
  std::array<at::Tensor, 2> w_hh;    // per direction (G*H, P)
  std::array<at::Tensor, 2> w_hr;    // per direction (P, H) or undefined
  std::optional<at::Tensor> lengths;  // (N) int64
  at::Tensor dgh;                    // (D, T, N, G*H), out
  at::Tensor dgi;                    // (D, T, N, G*H), out: kHiddenBias cells
  at::Tensor dhr;                    // (D, T, N, P), out: projections
  at::Tensor dh0;                    // (D, N, P), out
  at::Tensor dc0;                    // (D, N, H), out: kCellState cells
  bool state_grad = true;            // false: dh0 and dc0 may be left unwritten
};

// The weight gradients of one direction of a layer from its gate gradients,
// in one pass over them: on the CPU, for a few rows (a cell's step, a short
// call), where four ATen GEMMs and sums cost more around the arithmetic than
// in it. Every tensor contiguous, of one dtype; shapes as WeightGradParams'
// (recurrence_params.h).
struct WeightGradLoop {
  at::Tensor dgi, dgh;   // (R, G*H); dgh is dgi but for kHiddenBias cells
  at::Tensor x;          // (R, C)
  at::Tensor h0;         // (N, P)
  at::Tensor y;          // (R, P): direction 0's output
  at::Tensor w_ih;       // (G*H, C)
  at::Tensor dw_ih, dw_hh;  // out
  at::Tensor db_ih, db_hh;  // out, or undefined without biases
  at::Tensor dx;            // out, or undefined
};

// The time loops of one kind of device. The CPU's are the default; the CUDA
// module registers its own when it loads, claiming CUDA tensors (and, while
// its emulation is on, CPU tensors).
struct DeviceLoops {
  bool (*claims)(const at::Tensor& t);
  void (*forward)(CellKind cell, const ForwardLoop& a);
  void (*backward)(CellKind cell, const BackwardLoop& a);
};
void register_device_loops(const DeviceLoops& loops);

// The time loop of the device that claims the tensors (u or dy).
void forward_recurrence(CellKind cell, const ForwardLoop& a);
void backward_recurrence(CellKind cell, const BackwardLoop& a);

void forward_recurrence_cpu(CellKind cell, const ForwardLoop& a);

// at::empty(sizes, opt), asking for transparent huge pages where it is a CPU
// buffer of several MB (recurrence_cpu.cpp), without the dispatcher.
at::Tensor buffer(at::IntArrayRef sizes, const at::TensorOptions& opt);

// buffer(sizes, opt) for a tensor that is freed soon after and asked for
// again at the same size by the next call (the output, the workspace, the
// gate gradients, the packed weights, the weights' gradients): on the CPU,
// not pinned, from 256 KB, memory that an earlier one of the same size gave
// back where there is some (recurrence_cpu.cpp), so that it is not faulted
// in afresh.
at::Tensor recycled(at::IntArrayRef sizes, const at::TensorOptions& opt);
// The bytes of recycled() blocks cached (freed, kept for the next call),
// live, and the most ever live at once.
std::array<int64_t, 3> recycled_bytes();
// Frees the blocks recycled() keeps; the most ever live starts again from
// the blocks live now.
void release_recycled();

// Whether the CPU's own kernels run the time loop of t (no device claims it).
bool cpu_loop(const at::Tensor& t);

// u = x W_ih^T of every direction, (D, T, N, G*H): one GEMM a direction.
at::Tensor input_term(const ForwardLoop& a);
void backward_recurrence_cpu(CellKind cell, const BackwardLoop& a);
// WeightGradLoop on the CPU, float32 and float64 (any other dtype is an
// error: the caller keeps ATen's GEMMs for those).
void weight_grads_cpu(const WeightGradLoop& a);
// The products of a layer's backward with few columns, on the CPU, float32
// and float64, where ATen's GEMMs (MKL) reach half of the multiply-add
// peak: g^T z (G*H, C), in a recycled() buffer, for g (R, G*H) contiguous
// and z the rows of a then those of b (undefined for none; each (rows, C)
// with unit column stride, rows any distance apart): dW_ih (z = the input)
// and dW_hh (z = the states before each step). And dx = dgi w_ih (dx +=
// where `add`), for dgi (R, G*H), w_ih (G*H, C) and dx (R, C), contiguous.
// Each result is one thread's sum in a fixed order: the same bits on any
// number of threads.
at::Tensor narrow_weight_grad_cpu(const at::Tensor& g, const at::Tensor& a,
                                  const at::Tensor& b = at::Tensor());
void narrow_input_grad_cpu(const at::Tensor& dgi, const at::Tensor& w_ih, const at::Tensor& dx,
                           bool add);
// out = a b (out += a b where `add`), 2-D, on the CPU: ATen's GEMM (MKL)
// with the same bits on any number of threads.
void product_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool add);
// Whether those beat ATen's GEMMs on this CPU for C columns of x's dtype
// (the choice depends on the shapes, dtype, instruction set and the
// processor's maker alone, never on the threads).
bool narrow_weight_grad_pays(const at::Tensor& x, int64_t C);
bool narrow_input_grad_pays(const at::Tensor& x, int64_t C);

// The instruction set the CPU kernels run with: "avx512", "avx2" or "base".
const char* cpu_isa();
// Forces an instruction set ("auto" for the best); returns false when this
// processor lacks it.
bool set_cpu_isa(const std::string& name);
// Whether the CPU time loops pack the weights: "auto" (where the call's rows
// times steps repay it), "always" or "never" (tests and benchmarks).
void set_cpu_packing(const std::string& name);
const char* cpu_packing();
// Whether bfloat16 calls run their steps' products in bfloat16 where they
// can: "auto" (the default) or "never"; whether they can here (AMX-BF16 or
// AVX512-BF16, and the AVX-512 kernels); and on what: "amx", "avx512_bf16"
// or "none".
void set_cpu_tiles(const std::string& name);
const char* cpu_tiles();
bool cpu_tiles_available();
const char* cpu_tiles_unit();
// The float32 multiply-add rate of `threads` threads (one per core), lane
// multiply-adds a second, with the instruction set the kernels run: the
// best of `trials` runs of a probe of twelve independent FMA chains taking
// about `seconds` each. The benchmark's roofline.
double cpu_fma_rate(double seconds, int64_t threads, int64_t trials);
// a w (a and w rounded to bfloat16, float32 sums), or c + that, on the
// CPU's bfloat16 products alone (the kernels' tile_gemm(), for the tests).
at::Tensor tile_matmul(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& c);

}  // namespace fastrnn
