// The geometry of the single-kernel paths, for the bodies and the path
// chooser alike: a launch's Geometry, how a cluster or grid group shares out
// the units, row tiles, and the shared-memory layout of each kernel.
#pragma once

#include <cstdint>

#include "cuda/recurrence_cuda_types.h"

namespace fastrnn {
namespace cuda {

// Shared-memory layout. A dot product reads 16 bytes of weights at a time
// (a chunk: 4 floats, 2 doubles or 8 halves) and the matching chunk of a
// state row in A. State rows are padded to whole chunks (row_stride) with
// zeros, so that a dot product needs no tail; weight rows also to an odd
// number of 16-byte units (weight_stride), so that the eight threads of a
// warp that share a 128-byte access phase, each on its own row, land on
// distinct banks.

template <typename Wt>
FASTRNN_HD constexpr int64_t chunk() {
  return 16 / static_cast<int64_t>(sizeof(Wt));
}
template <typename Wt>
FASTRNN_HD int64_t row_stride(int64_t n) {
  return (n + chunk<Wt>() - 1) / chunk<Wt>() * chunk<Wt>();
}
template <typename Wt>
FASTRNN_HD int64_t weight_stride(int64_t n) {
  const int64_t s = row_stride<Wt>(n);
  return (s / chunk<Wt>()) % 2 == 1 ? s : s + chunk<Wt>();
}

// A thread group of up to kRowTile batch rows: each weight chunk a lane
// loads serves that many rows, which is what bounds a step once a block
// holds several rows (shared memory delivers 128 bytes a cycle).
constexpr int kRowTile = 4;

FASTRNN_HD int64_t row_tiles(int64_t R) { return (R + kRowTile - 1) / kRowTile; }
FASTRNN_HD int64_t tile_rows(int64_t r0, int64_t R) { return R - r0 < kRowTile ? R - r0 : kRowTile; }

// i / n and i % n for the indices of the per-step loops, which index a
// block's shared memory (far below 2^32): in 32 bits, a fraction of the cost
// of a 64-bit division on the device.
struct DivMod {
  int64_t q, r;
};
FASTRNN_HD DivMod divmod(int64_t i, int64_t n) {
  const uint32_t a = static_cast<uint32_t>(i), b = static_cast<uint32_t>(n), q = a / b;
  return DivMod{q, a - q * b};
}

// Rows of the block that starts at batch row n0: `rows`, fewer in the last.
FASTRNN_HD int64_t rows_in_block(int64_t n0, int64_t rows, int64_t N) {
  return rows < N - n0 ? rows : N - n0;
}

// The geometry of a launch, as recurrence_cuda_paths.h computes it and every
// body reads it: rows per block, blocks per cluster or grid group, lanes per
// item.
struct Geometry {
  int64_t rows;
  int64_t size;
  int64_t split;
};

// The share of member q of a cluster or grid group of `size`: units [q * Hc,
// q * Hc + owned_units), Hc = ceil(H / size), fewer or none at the end.
FASTRNN_HD int64_t share_units(int64_t H, int64_t size) { return (H + size - 1) / size; }
FASTRNN_HD int64_t owned_units(int64_t H, int64_t size, int64_t q) {
  const int64_t Hc = share_units(H, size), c0 = q * Hc;
  return c0 >= H ? 0 : (c0 + Hc <= H ? Hc : H - c0);
}

// The shared memory of each kernel, in bytes, and where each array starts
// (16-byte aligned for those read 16 bytes at a time). Forward: w, state
// (1 or 2 buffers), cs; backward: wt, z (1 or 2 buffers), dh, dc.
template <typename Cell, typename T>
struct SmemLayout {
  using A = typename AccOf<T>::type;
  using Wt = typename SmemWeightOf<T>::type;
  int64_t w, state, cs, bytes;          // forward offsets
  int64_t wt, z, dh, dc;                // backward offsets
  int64_t Wst, Ss, Mst, Ms;             // strides
  int64_t units;                        // the share's units
  FASTRNN_HD static SmemLayout forward(int64_t H, int64_t P, int64_t rows, int64_t share,
                                       int64_t state_buffers) {
    SmemLayout l{};
    l.units = share;
    l.Wst = weight_stride<Wt>(P);
    l.Ss = row_stride<Wt>(P);
    l.w = 0;
    l.state = Cell::kGates * share * l.Wst * static_cast<int64_t>(sizeof(Wt));
    l.cs = l.state + state_buffers * rows * l.Ss * static_cast<int64_t>(sizeof(A));
    l.bytes = l.cs + (Cell::kCellState ? rows * share * static_cast<int64_t>(sizeof(A)) : 0);
    return l;
  }
  FASTRNN_HD static SmemLayout backward(int64_t H, int64_t rows, int64_t share,
                                        int64_t z_buffers) {
    SmemLayout l{};
    const int64_t GH = Cell::kGates * H;
    l.units = share;
    l.Mst = weight_stride<Wt>(GH);
    l.Ms = row_stride<Wt>(GH);
    l.wt = 0;
    l.z = share * l.Mst * static_cast<int64_t>(sizeof(Wt));
    l.dh = l.z + z_buffers * rows * l.Ms * static_cast<int64_t>(sizeof(A));
    l.dc = l.dh + rows * share * static_cast<int64_t>(sizeof(A));
    l.bytes = l.dc + (Cell::kCellState ? rows * share * static_cast<int64_t>(sizeof(A)) : 0);
    return l;
  }
};

}  // namespace cuda
}  // namespace fastrnn
