// The CUDA time loop's switches, as the Python module exposes them: the
// forced path, which path ran, the emulator (tests), and the pure path
// choice on the emulated device (tests).
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace fastrnn {

// Forces the CUDA path ("auto", "persistent", "cluster", "grid" or "step";
// see cuda/recurrence_cuda_paths.h) and, for the cluster and grid paths, the
// blocks per cluster or group (0: chosen per call). A forced path that
// cannot run a call raises rather than switching.
bool set_cuda_path(const std::string& name, int64_t blocks = 0);
// The forced path and blocks: ("auto", 0) unless set.
std::tuple<std::string, int64_t> cuda_path();
// The path the last CUDA time loop on this thread took: "persistent",
// "cluster", "grid", "step", or "none" before the first.
std::string last_cuda_path();
// The path the last backward time loop took, on any thread: autograd runs a
// CUDA backward on a thread of its own, where last_cuda_path() cannot see it.
std::string last_cuda_backward_path();

// CPU tensors go to the CUDA kernels' emulator while this is on (tests only).
void set_cuda_emulation(bool on);
bool cuda_emulation();
// How long a grid-path barrier waits before the launch fails, milliseconds.
void set_grid_timeout_ms(int64_t ms);
// Blocks the emulator runs at once (tests of the grid barrier's timeout).
void set_emulator_blocks(int64_t blocks);

// The launch choose_launch() gives on the emulated device: the path's name,
// (grid_x, grid_y, threads, smem, rows, size, split, the kernel's bound on
// threads), and the error of a forced path that cannot run.
std::tuple<std::string, std::vector<int64_t>, std::string> choose_emulated_launch(
    const std::string& cell, bool forward, int64_t T, int64_t N, int64_t H, int64_t P, int64_t D,
    int64_t elem_bytes, bool proj, const std::string& path, int64_t blocks);

}  // namespace fastrnn
