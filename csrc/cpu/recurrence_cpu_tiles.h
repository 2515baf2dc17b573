// A step's products on the processor's matrix unit in bfloat16 (Intel AMX:
// tile registers of 16 rows, TDPBF16PS, products of bfloat16 pairs summed
// in float32), or where it has none but AVX512-BF16, with VDPBF16PS on the
// same packed weights, for the layers whose tensors are bfloat16. The rows
// [x_t | h] of a step, rounded to bfloat16 as torch.nn's bfloat16 layers
// round their state, meet the weights [W_ih | W_hh]^T packed into tiles
// once a call; the gates' pre-activations come out in float32, in the
// layout of the kernels' own step products (Kernels::step_gemm), and the
// cell's step runs on them in float32 as for every other type.
#pragma once

#include <cstdint>

namespace fastrnn {

// What a call's steps need: the packed weights of each direction (all of
// the units, or a thread's slice of them) and their shape. The backward's
// carry (tile_gemm()) uses b, kp and ldg alone.
struct TileProducts {
  const uint16_t* b[2] = {nullptr, nullptr};  // per direction: kp x ldg in tiles (tile_pack)
  int64_t C = 0, P = 0;
  int64_t kp = 0;                             // C + P padded to a tile's 32
  int64_t ldg = 0;                            // the step's gate columns, a multiple of 16
  // The step's columns from which the blocks sum the hidden part alone
  // (zeros in the weights' first C rows), and from which the input part
  // alone (zeros past them), for VDPBF16PS to skip the zeros (tile_pack()'s
  // `apart` blocks); none by default.
  int64_t hidden_from = INT64_MAX, input_from = INT64_MAX;
};

namespace cpu {

// Whether this processor has AMX-BF16 and the system lets this process use
// its tile registers, or has AVX512-BF16 (asked once).
bool tiles_available();

// Which of them runs the products: "amx", "avx512_bf16" or "none".
const char* tile_unit();

// C + P padded to whole tiles.
int64_t tile_depth(int64_t C, int64_t P);

// Packs one direction's weights, or a slice of their units, for
// tile_step(): column c of the step's (G + apart) blocks of Jp columns
// (Kernels::step_gemm's layout: the gates summed, then the hidden and the
// input parts of the `apart` gates) holds W_ih's row over the first C and
// W_hh's over the next P of kp (zeros for a part a block does not sum, for
// the columns past J and the rows past C + P). Unit j of gate g is row
// g * bs + j of w_ih (C wide) and w_hh (P wide), which hold bfloat16 values
// in float32. Writes the columns [c0, c1), whole tiles of 16, of out
// (kp * (G + apart) * Jp).
void tile_pack(const float* w_ih, const float* w_hh, int64_t G, int64_t apart, int64_t bs,
               int64_t J, int64_t Jp, int64_t C, int64_t P, int64_t kp, uint16_t* out, int64_t c0,
               int64_t c1);

// Packs columns [c0, c1) (whole tiles of 16) of a K x J matrix, element
// (k, j) at w[k * ldw + j] (bfloat16 values in float32), for tile_gemm():
// kp * padded(J) values of out, zeros past J and K.
void tile_pack_rows(const float* w, int64_t ldw, int64_t K, int64_t J, int64_t kp, uint16_t* out,
                    int64_t c0, int64_t c1);

// c (R x t.ldg, rows ldc apart) = a (R x K, rows lda apart, rounded to
// bfloat16) B of direction d (tile_pack_rows(), K <= t.kp), or c += that.
void tile_gemm(const TileProducts& t, int64_t d, int64_t R, const float* a, int64_t lda, int64_t K,
               float* c, int64_t ldc, bool accumulate);

// gates (R x ldg, ldg = t.ldg) = [x | h] B of direction d for R rows: x's
// rows ldx apart (C wide), h's ldh apart (P wide), each rounded to
// bfloat16 into a buffer of the calling thread's.
void tile_step(const TileProducts& t, int64_t d, int64_t R, const float* x, int64_t ldx,
               const float* h, int64_t ldh, float* gates, int64_t ldg);

}  // namespace cpu
}  // namespace fastrnn
