// See recurrence_cuda_emulate.h.
#include "cuda/recurrence_cuda_emulate.h"

#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace fastrnn {
namespace cuda {
namespace {

class Barrier {
 public:
  explicit Barrier(int64_t count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int64_t count_;
  int64_t arrived_ = 0;
  int64_t generation_ = 0;
};

struct HostBlock {
  int64_t tid, threads;
  Barrier* barrier;
  void sync() const { barrier->wait(); }
};

// Runs body(bx, by, smem, block) for every block of a grid, every thread of a
// block on its own std::thread; shared memory starts as NaN.
template <typename Body>
void run_grid(int64_t gx, int64_t gy, int threads, int64_t smem_bytes, const Body& body) {
  std::vector<double> smem((smem_bytes + 7) / 8);
  for (int64_t by = 0; by < gy; ++by) {
    for (int64_t bx = 0; bx < gx; ++bx) {
      std::memset(smem.data(), 0xff, smem.size() * sizeof(double));
      Barrier barrier(threads);
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int64_t tid = 0; tid < threads; ++tid)
        pool.emplace_back([&, tid] {
          body(bx, by, reinterpret_cast<unsigned char*>(smem.data()),
               HostBlock{tid, threads, &barrier});
        });
      for (auto& t : pool) t.join();
    }
  }
}

// A block of a cluster or of a grid group: sync() waits for the block's own
// threads, cluster_sync() and group_sync() for every thread of the group.
struct HostGroupBlock {
  int64_t tid, threads, rank, size;
  const std::vector<unsigned char*>* members;
  Barrier* block;
  Barrier* group;
  unsigned char* peer(int64_t q) const { return (*members)[q]; }
  void sync() const { block->wait(); }
  void cluster_sync() const { group->wait(); }
  void group_sync(int64_t) const { group->wait(); }
};

// Runs body(g, d, smem, block) for every group (g, d) of `size` blocks, all
// blocks of a group at once, each with its own NaN-poisoned shared memory.
template <typename Body>
void run_groups(int64_t groups, int64_t D, int64_t size, int threads, int64_t smem_bytes,
                const Body& body) {
  std::vector<std::vector<double>> smem(size, std::vector<double>((smem_bytes + 7) / 8));
  std::vector<unsigned char*> members(size);
  for (int64_t q = 0; q < size; ++q) members[q] = reinterpret_cast<unsigned char*>(smem[q].data());
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t g = 0; g < groups; ++g) {
      for (auto& m : smem) std::memset(m.data(), 0xff, m.size() * sizeof(double));
      Barrier group(size * threads);
      std::vector<std::unique_ptr<Barrier>> blocks;
      for (int64_t q = 0; q < size; ++q) blocks.push_back(std::make_unique<Barrier>(threads));
      std::vector<std::thread> pool;
      pool.reserve(size * threads);
      for (int64_t q = 0; q < size; ++q)
        for (int64_t tid = 0; tid < threads; ++tid)
          pool.emplace_back([&, q, tid] {
            body(g, d, members[q],
                 HostGroupBlock{tid, threads, q, size, &members, blocks[q].get(), &group});
          });
      for (auto& t : pool) t.join();
    }
  }
}

template <typename Fn>
void for_each_element(int64_t D, int64_t NH, const Fn& fn) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < NH; ++i) fn(d, i);
}

}  // namespace

#define FASTRNN_DEFINE_CUDA_EMULATORS(T)                                                      \
  void emulate_forward_persistent(const ForwardParams<T>& p, int64_t rows) {                 \
    run_grid((p.N + rows - 1) / rows, p.D, persistent_threads(rows, p.H),                    \
             persistent_smem_bytes(p.H, rows, sizeof(AccOf<T>::type) == 8),                  \
             [&](int64_t bx, int64_t d, unsigned char* smem, const HostBlock& b) {           \
               forward_persistent_body(p, rows, bx, d, smem, b);                             \
             });                                                                             \
  }                                                                                          \
  void emulate_backward_persistent(const BackwardParams<T>& p, int64_t rows) {               \
    run_grid((p.N + rows - 1) / rows, p.D, persistent_threads(rows, p.H),                    \
             persistent_smem_bytes(p.H, rows, sizeof(AccOf<T>::type) == 8),                  \
             [&](int64_t bx, int64_t d, unsigned char* smem, const HostBlock& b) {           \
               backward_persistent_body(p, rows, bx, d, smem, b);                            \
             });                                                                             \
  }                                                                                          \
  void emulate_forward_cluster(const ForwardParams<T>& p, int64_t rows, int64_t cluster) {   \
    run_groups((p.N + rows - 1) / rows, p.D, cluster,                                      \
                 persistent_threads(rows, cluster_columns(p.H, cluster)),                    \
                 cluster_smem_bytes(p.H, cluster, rows, sizeof(AccOf<T>::type) == 8),        \
                 [&](int64_t g, int64_t d, unsigned char* smem, const HostGroupBlock& b) { \
                   forward_cluster_body(p, rows, g, d, smem, b);                             \
                 });                                                                         \
  }                                                                                          \
  void emulate_backward_cluster(const BackwardParams<T>& p, int64_t rows, int64_t cluster) { \
    run_groups((p.N + rows - 1) / rows, p.D, cluster,                                      \
                 persistent_threads(rows, cluster_columns(p.H, cluster)),                    \
                 cluster_smem_bytes(p.H, cluster, rows, sizeof(AccOf<T>::type) == 8),        \
                 [&](int64_t g, int64_t d, unsigned char* smem, const HostGroupBlock& b) { \
                   backward_cluster_body(p, rows, g, d, smem, b);                            \
                 });                                                                         \
  }                                                                                          \
  void emulate_forward_grid(const ForwardParams<T>& p, int64_t rows, int64_t size,         \
                            AccOf<T>::type* exchange) {                                      \
    run_groups((p.N + rows - 1) / rows, p.D, size,                                           \
               persistent_threads(rows, cluster_columns(p.H, size)),                         \
               grid_smem_bytes(p.H, size, rows, sizeof(AccOf<T>::type) == 8),                \
               [&](int64_t g, int64_t d, unsigned char* smem, const HostGroupBlock& b) {     \
                 forward_grid_body(p, rows, g, d, exchange, smem, b);                        \
               });                                                                           \
  }                                                                                          \
  void emulate_backward_grid(const BackwardParams<T>& p, int64_t rows, int64_t size,       \
                             AccOf<T>::type* exchange) {                                     \
    run_groups((p.N + rows - 1) / rows, p.D, size,                                           \
               persistent_threads(rows, cluster_columns(p.H, size)),                         \
               grid_smem_bytes(p.H, size, rows, sizeof(AccOf<T>::type) == 8),                \
               [&](int64_t g, int64_t d, unsigned char* smem, const HostGroupBlock& b) {     \
                 backward_grid_body(p, rows, g, d, exchange, smem, b);                       \
               });                                                                           \
  }                                                                                          \
  void emulate_forward_step(const ForwardParams<T>& p, int64_t s, const AccOf<T>::type* hw,  \
                            AccOf<T>::type* state) {                                         \
    for_each_element(p.D, p.N * p.H,                                                         \
                     [&](int64_t d, int64_t i) { forward_step_body(p, s, hw, state, d, i); }); \
  }                                                                                          \
  void emulate_backward_step(const BackwardParams<T>& p, int64_t s, const AccOf<T>::type* dh, \
                             AccOf<T>::type* dz_acc) {                                       \
    for_each_element(p.D, p.N * p.H, [&](int64_t d, int64_t i) {                             \
      backward_step_body(p, s, dh, dz_acc, d, i);                                            \
    });                                                                                      \
  }                                                                                          \
  void emulate_backward_step_carry(const BackwardParams<T>& p, int64_t s,                    \
                                   const AccOf<T>::type* dzw, AccOf<T>::type* dh) {          \
    for_each_element(p.D, p.N * p.H, [&](int64_t d, int64_t i) {                             \
      backward_step_carry_body(p, s, dzw, dh, d, i);                                         \
    });                                                                                      \
  }

FASTRNN_DEFINE_CUDA_EMULATORS(float)
FASTRNN_DEFINE_CUDA_EMULATORS(double)
FASTRNN_DEFINE_CUDA_EMULATORS(__half)
FASTRNN_DEFINE_CUDA_EMULATORS(__nv_bfloat16)

}  // namespace cuda
}  // namespace fastrnn
