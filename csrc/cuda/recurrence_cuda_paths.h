// The CUDA time loop's four paths and the one descriptor of each launch:
// which path a call takes, its grid, threads, shared memory, cluster or
// group size and the geometry its kernel body assumes. The device launchers
// and the emulator both run exactly what choose_launch() returns.
//
//  - persistent: one kernel runs all T steps. A thread block owns a few batch
//    rows of one direction and keeps W_hh and its rows' state in shared
//    memory for the whole sequence; rows never interact, so blocks never wait
//    for each other. Taken when W_hh fits one block's shared memory.
//  - cluster (sm_90): one kernel runs all T steps; W_hh is split by units
//    between the blocks of a thread-block cluster (2, 4 or 8), which exchange
//    each step's state through distributed shared memory. Taken when W_hh
//    fits a cluster's shared memory but not one block's.
//  - grid: one cooperative kernel runs all T steps; W_hh is split by units
//    between the blocks of a group placed anywhere on the device, which
//    exchange each step's state through global memory and a flag barrier.
//    Taken when W_hh fits the shared memory of the device's blocks and the
//    step is small enough that the kernel beats the GEMM.
//  - step: per step, the hidden-state GEMM through cuBLAS (on the torch side)
//    and elementwise kernels. Taken for everything else, and for LSTM
//    projections.
//
// Every single-kernel launch fits in one wave of the device: all its blocks
// resident at once, as the device's occupancy says (the grid path needs it;
// for the others a second wave would double the time), else the next path.
//
// Nothing here knows torch or the CUDA runtime: the device comes in as a
// DeviceModel, which the torch side fills from the runtime's queries and the
// emulator from a model of an H100/H200, so that the choice is a pure
// function the tests call directly.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "cells.h"
#include "cuda/recurrence_cuda_layout.h"
#include "cuda/recurrence_cuda_types.h"

namespace fastrnn {
namespace cuda {

enum class Path : int { automatic = 0, persistent = 1, cluster = 2, grid = 3, step = 4 };
constexpr int kPaths = 5;
// The one table of the paths' names ("auto", "persistent", ...), which
// fastrnn.kernels.CUDA_PATHS repeats (a test checks it).
const char* path_name(Path p);

// Threads of a block of the persistent, cluster and grid kernels, at most,
// per kernel: each declares its bound with __launch_bounds__(bound, 1),
// which leaves a thread 128 registers at 512, 168 at 384 and 255 at 256.
// The bounds give every kernel the registers its code needs (ptxas -v on
// sm_80, sm_90, sm_100 and sm_120): the gated cells' cluster and grid
// kernels, and all of their kernels in double, need up to 254; their
// persistent kernels, and the Elman cell's cluster and grid kernels in 16-bit
// types and double, a little over 128. No kernel spills registers to local
// memory, and the build fails on a spill (setup.py passes ptxas
// --warn-on-spills --warning-as-error).
constexpr int64_t kMaxThreads = 512;
constexpr int64_t block_limit(CellKind cell, int64_t elem_bytes, Path path) {
  const bool gated = cell == CellKind::lstm || cell == CellKind::gru;
  const bool shared = path == Path::cluster || path == Path::grid;  // W_hh split between blocks
  if (gated) return shared || elem_bytes == 8 ? 256 : 384;
  if (shared && elem_bytes != 4) return 384;
  return kMaxThreads;
}
constexpr int64_t kStepThreads = 256;

struct DeviceModel {
  int64_t sms;         // multiprocessors
  int64_t smem_optin;  // dynamic shared memory a block may opt in to, bytes
  bool clusters;       // sm_90 or newer, and the loaded kernels carry sm_90 code
  bool cooperative;    // cooperative launches
  // Blocks of the path's forward or backward kernel resident on one
  // multiprocessor with `threads` threads and `smem` bytes of shared memory.
  std::function<int64_t(Path path, bool forward, int64_t threads, int64_t smem)> blocks_per_sm;
  // Clusters of `size` such blocks resident on the device at once.
  std::function<int64_t(bool forward, int64_t size, int64_t threads, int64_t smem)>
      active_clusters;
};

// The emulator's device, for the kernels of one cell and storage size: an
// H100/H200 (132 multiprocessors, 227 KB of shared memory per block and 228
// KB per multiprocessor, 2048 threads and 64K registers a multiprocessor,
// clusters placed within graphics processing clusters of 16
// multiprocessors), each kernel taking as many registers a thread as its
// block_limit leaves it.
DeviceModel emulated_device(CellKind cell, int64_t elem_bytes);

struct Problem {
  CellKind cell;
  bool forward;
  int64_t T, N, H, P, D;
  int64_t elem_bytes;  // of the storage type: 2 (float16, bfloat16), 4 or 8
  bool proj;           // LSTM projections: the step path only
};

struct Launch {
  Path path;
  int64_t grid_x, grid_y;  // blocks: (blocks per cluster or group) * groups, D
  int64_t threads;
  int64_t smem;            // dynamic shared memory, bytes
  Geometry geometry;       // rows per block, blocks per cluster or group, lanes per item
};

struct Choice {
  Launch launch;
  std::string error;  // why a forced path cannot run; empty when it can
};

// The launch of the call: persistent where W_hh fits one block, else a
// cluster where it fits one, else the grid where it fits the device and
// pays, else the step path, each only within one wave; `forced` (not
// automatic) takes that path or explains why it cannot, and `blocks` (not
// 0) fixes the blocks per cluster or group.
Choice choose_launch(const DeviceModel& m, const Problem& pr, Path forced, int64_t blocks);

// The shared memory of the path's forward or backward kernel for `rows`
// rows and a share of `share` units, and the lanes per item and threads of
// its blocks.
int64_t smem_bytes(const Problem& pr, Path path, int64_t rows, int64_t share);
void block_shape(const Problem& pr, Path path, int64_t rows, int64_t share, int64_t* split,
                 int64_t* threads);

}  // namespace cuda
}  // namespace fastrnn
