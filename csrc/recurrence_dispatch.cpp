// Which device runs a layer's time loop: the first registered device whose
// claims() takes the tensors, else the CPU's own kernels.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>

#include "recurrence.h"

namespace fastrnn {
namespace {

// One slot is enough: CUDA is the only device besides the CPU.
std::atomic<const DeviceLoops*>& device_slot() {
  static std::atomic<const DeviceLoops*> slot{nullptr};
  return slot;
}

const DeviceLoops* claimed(const at::Tensor& t) {
  const DeviceLoops* loops = device_slot().load(std::memory_order_acquire);
  if (loops != nullptr && loops->claims(t)) return loops;
  TORCH_CHECK(t.is_cpu(), "fastrnn was built without CUDA: rebuild with FASTRNN_CUDA=1");
  return nullptr;
}

}  // namespace

void register_device_loops(const DeviceLoops& loops) {
  static const DeviceLoops copy = loops;
  device_slot().store(&copy, std::memory_order_release);
}

at::Tensor input_term(const ForwardLoop& a) {
  const int64_t D = a.h0.size(0), T = a.x.size(0), N = a.x.size(1), GH = a.w_ih[0].size(0);
  const at::Tensor x = a.x.reshape({T * N, a.x.size(2)});
  at::Tensor u = at::empty({D, T * N, GH}, a.x.options());
  for (int64_t d = 0; d < D; ++d) {
    at::Tensor u_d = u[d];
    at::mm_out(u_d, x, a.w_ih[d].t());
  }
  return u.view({D, T, N, GH});
}

bool cpu_loop(const at::Tensor& t) { return claimed(t) == nullptr; }

void forward_recurrence(CellKind cell, const ForwardLoop& a) {
  if (const DeviceLoops* loops = claimed(a.x)) {
    if (a.u.defined()) return loops->forward(cell, a);
    ForwardLoop b = a;
    b.u = input_term(a);
    return loops->forward(cell, b);
  }
  forward_recurrence_cpu(cell, a);
}

void backward_recurrence(CellKind cell, const BackwardLoop& a) {
  if (const DeviceLoops* loops = claimed(a.dgh)) return loops->backward(cell, a);
  backward_recurrence_cpu(cell, a);
}

}  // namespace fastrnn
