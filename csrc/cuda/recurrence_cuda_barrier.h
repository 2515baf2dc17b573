// The grid path's group barrier: a flag barrier on a counter in global
// memory, which the device runs on cuda::atomic_ref and the emulator on the
// __atomic builtins, with a timeout that stops the launch instead of
// hanging.
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__)
#include <cuda/atomic>
#else
#include <chrono>
#include <type_traits>
#endif

#include "cuda/recurrence_cuda_types.h"

namespace fastrnn {
namespace cuda {

// The flag barrier of step s: every member's thread 0 adds one to the
// group's counter with release order and waits, with acquire order, until
// all `size` have; the block barriers around it hold the block's other
// threads on either side. The device and the emulator run this same code,
// on cuda::atomic_ref and HostAtomicRef. A wait past b.timeout_ns (the
// group's blocks not all resident: another process or an NCCL kernel holding
// multiprocessors) raises the launch's abort flag instead of hanging; every
// block that sees the flag in a wait leaves the kernel, so the launch ends,
// and the host reads the flag and raises (no trap, so the CUDA context and
// the process survive). Returns whether the block goes on.
#if !defined(__CUDA_ARCH__)
// std::atomic_ref's interface for the emulator, on the __atomic builtins so
// that it builds as C++17 (torch before 2.13 compiles extensions as C++17).
// ThreadSanitizer instruments the builtins with the orderings given. The
// order is a type, so that it stays a constant at any optimisation level.
template <int Order>
using HostOrder = std::integral_constant<int, Order>;
struct HostAtomicRef {
  unsigned int* p;
  explicit HostAtomicRef(unsigned int& v) : p(&v) {}
  template <int Order>
  unsigned int fetch_add(unsigned int v, HostOrder<Order>) {
    return __atomic_fetch_add(p, v, Order);
  }
  template <int Order>
  unsigned int load(HostOrder<Order>) const {
    return __atomic_load_n(p, Order);
  }
};
#endif

FASTRNN_HD int64_t clock_ns() {
#if defined(__CUDA_ARCH__)
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<int64_t>(t);
#else
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
#endif
}

template <class Block>
FASTRNN_HD bool group_barrier(const Block& b, int64_t s) {
  b.sync();
  bool stop = false;
  if (b.tid == 0) {
    const unsigned int target = static_cast<unsigned int>((s + 1) * b.size);
#if defined(__CUDA_ARCH__)
    ::cuda::atomic_ref<unsigned int, ::cuda::thread_scope_device> counter(*b.counter);
    ::cuda::atomic_ref<unsigned int, ::cuda::thread_scope_device> abort(*b.abort);
    constexpr auto release = ::cuda::memory_order_release;
    constexpr auto acquire = ::cuda::memory_order_acquire;
#else
    HostAtomicRef counter(*b.counter);
    HostAtomicRef abort(*b.abort);
    constexpr HostOrder<__ATOMIC_RELEASE> release{};
    constexpr HostOrder<__ATOMIC_ACQUIRE> acquire{};
#endif
    counter.fetch_add(1u, release);
    const int64_t start = clock_ns();
    while (counter.load(acquire) < target) {
      b.spin();
      if (abort.load(acquire) != 0) {
        stop = true;
        break;
      }
      if (clock_ns() - start > b.timeout_ns) {
        abort.fetch_add(1u, release);
        stop = true;
        break;
      }
    }
  }
  return !b.sync_or(stop);
}

}  // namespace cuda
}  // namespace fastrnn
