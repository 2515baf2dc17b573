// The device-specific time loop of one layer, all directions at once, as the
// stack orchestration in rnn_ops.cpp calls it. Arguments are validated there;
// each implementation only checks what its own kernel assumes.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <string>

namespace fastrnn {

// Arguments of the forward time loop: u (D, T, N, H), w_hh_t (D, H, H) =
// W_hh transposed, h0 (D, N, H), lengths (N) int64 or none; it writes
// y (T, N, D*H) and hn (D, N, H).
// Arguments of the backward time loop: dy (T, N, D*H), dhn (D, N, H) or none,
// y (T, N, D*H), w_hh (D, H, H), lengths (N) or none; it writes
// dz (D, T, N, H) and dh0 (D, N, H).

void forward_recurrence_cpu(const at::Tensor& u, const at::Tensor& w_hh_t, const at::Tensor& h0,
                            const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                            const at::Tensor& hn, bool relu);
void backward_recurrence_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dhn,
                             const at::Tensor& y, const at::Tensor& w_hh,
                             const std::optional<at::Tensor>& lengths, const at::Tensor& dz,
                             const at::Tensor& dh0, bool relu);
// The instruction set the CPU kernels run with: "avx512", "avx2" or "base".
const char* cpu_isa();
// Forces an instruction set (tests use it to cover every variant); returns
// false when this processor lacks it.
bool set_cpu_isa(const std::string& name);

#ifdef FASTRNN_WITH_CUDA
void forward_recurrence_cuda(const at::Tensor& u, const at::Tensor& w_hh_t, const at::Tensor& h0,
                             const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                             const at::Tensor& hn, bool relu);
void backward_recurrence_cuda(const at::Tensor& dy, const std::optional<at::Tensor>& dhn,
                              const at::Tensor& y, const at::Tensor& w_hh,
                              const std::optional<at::Tensor>& lengths, const at::Tensor& dz,
                              const at::Tensor& dh0, bool relu);
// CPU tensors given to the two functions above run the CUDA kernels'
// emulator (cuda/recurrence_cuda_emulate.h); the orchestration sends them
// there while set_cuda_emulation(true) is in force (tests only).
void set_cuda_emulation(bool on);
bool cuda_emulation();
// Forces the CUDA path ("auto", "persistent", "cluster", "grid" or "step"; see
// cuda/recurrence_cuda_kernels.h) and, for the cluster and grid paths, the
// blocks per cluster or group (0: chosen per call).
bool set_cuda_path(const std::string& name, int64_t blocks = 0);
// The path the last CUDA time loop on this thread took: "persistent",
// "cluster", "grid", "step", or "none" before the first.
std::string last_cuda_path();
#endif

}  // namespace fastrnn
