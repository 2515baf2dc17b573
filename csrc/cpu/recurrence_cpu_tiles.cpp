// The bfloat16 step products (recurrence_cpu_tiles.h): on AMX tiles where
// the processor has them, else with AVX512-BF16's VDPBF16PS on the same
// packed weights. Only the functions marked with a target attribute are
// compiled for AMX, AVX512-BF16 or AVX-512, and only tile_step() and
// tile_gemm() call them, where tiles_available() said yes.
#include "cpu/recurrence_cpu_tiles.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include <c10/util/Exception.h>

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 11)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FASTRNN_TILES 1
#define FASTRNN_TILE_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))
#define FASTRNN_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define FASTRNN_AVX512_TARGET __attribute__((target("avx512f,avx512bw")))
#else
#define FASTRNN_TILES 0
#endif

namespace fastrnn {
namespace cpu {

namespace {

// float to bfloat16, rounded to nearest even as torch rounds (a NaN stays
// a quiet NaN).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

constexpr int64_t kTileRows = 16;  // rows of a tile register
constexpr int64_t kTileDepth = 32;  // bfloat16 values of a row of A's tile (64 bytes)
constexpr int64_t kTileCols = 16;   // float32 columns of a C tile
constexpr int64_t kTileB = kTileDepth * kTileCols;  // elements of a B tile (16 pairs of rows)

// A column tile of B from its 16 columns as rows of kp floats (cols): in
// bfloat16, pairs of rows (k, k + 1) side by side for each column, so that
// row k of column q lands at k * 16 + 2 * q + k % 2 of out.
void write_tile_columns(const float* cols, int64_t kp, uint16_t* out) {
  for (int64_t k = 0; k < kp; k += 2)
    for (int64_t q = 0; q < kTileCols; ++q) {
      out[k * kTileCols + 2 * q] = to_bf16(cols[q * kp + k]);
      out[k * kTileCols + 2 * q + 1] = to_bf16(cols[q * kp + k + 1]);
    }
}

#if FASTRNN_TILES

// The tile configuration (palette 1), every tile 16 rows of 64 bytes:
// tiles 0-3 hold C, 4-5 A, 6-7 B (16 rows of 16 pairs).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

FASTRNN_TILE_TARGET void configure() {
  TileConfig c;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = 64;
    c.rows[i] = static_cast<uint8_t>(kTileRows);
  }
  _tile_loadconfig(&c);
}

// RT x CT tiles of C (rows 16 apart, columns 16): a's RT row tiles (rows
// lda elements apart) times b's CT column tiles (bs elements apart), ks
// tiles deep.
template <int RT, int CT>
FASTRNN_TILE_TARGET inline void tile_block(const uint16_t* a, int64_t lda, const uint16_t* b,
                                           int64_t bs, int64_t ks, float* c, int64_t ldc,
                                           bool accumulate) {
  const int64_t sa = lda * 2;
  _tile_zero(0);
  if constexpr (CT > 1) _tile_zero(1);
  if constexpr (RT > 1) _tile_zero(2);
  if constexpr (RT > 1 && CT > 1) _tile_zero(3);
  for (int64_t k = 0; k < ks; ++k) {
    _tile_loadd(4, a + k * kTileDepth, sa);
    if constexpr (RT > 1) _tile_loadd(5, a + kTileRows * lda + k * kTileDepth, sa);
    _tile_loadd(6, b + k * kTileB, 64);
    if constexpr (CT > 1) _tile_loadd(7, b + bs + k * kTileB, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (CT > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (RT > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (RT > 1 && CT > 1) _tile_dpbf16ps(3, 5, 7);
  }
  // c += the sums where accumulating (the sums from zero, then added, as
  // the kernels' own GEMMs add them: the same bits however the columns are
  // split), through a scratch block.
  alignas(64) float sum[RT * kTileRows * CT * kTileCols];
  float* out = accumulate ? sum : c;
  const int64_t ld = accumulate ? CT * kTileCols : ldc, so = ld * 4;
  _tile_stored(0, out, so);
  if constexpr (CT > 1) _tile_stored(1, out + kTileCols, so);
  if constexpr (RT > 1) _tile_stored(2, out + kTileRows * ld, so);
  if constexpr (RT > 1 && CT > 1) _tile_stored(3, out + kTileRows * ld + kTileCols, so);
  if (accumulate)
    for (int64_t r = 0; r < RT * kTileRows; ++r)
      for (int64_t j = 0; j < CT * kTileCols; ++j) c[r * ldc + j] += sum[r * ld + j];
}

// float32 to bfloat16 as to_bf16() rounds, 16 at a time.
FASTRNN_AVX512_TARGET void to_bf16_row(const float* src, int64_t n, uint16_t* dst) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
  const __m512i abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  // (The zero-masked forms with every lane set: the same instructions, and
  // GCC 12 warns of the plain forms' undefined pass-through operand.)
  const __mmask16 all = 0xffff;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512i u = _mm512_loadu_si512(src + k);
    const __m512i hi = _mm512_maskz_srli_epi32(all, u, 16);
    __m512i r = _mm512_maskz_srli_epi32(
        all, _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(hi, one), half)), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm512_maskz_cvtepi32_epi16(all, r));
  }
  for (; k < n; ++k) dst[k] = to_bf16(src[k]);
}

// c (R x jt column tiles, rows ldc apart) = a (rows padded with zeros to
// whole tiles, kp apart) b, or c += that. Column tiles outermost, two at a
// time, so that their weights (kp x 32 bfloat16 each) are read once a step
// from wherever they are and then from L1 or L2 for every row tile; rows
// two tiles at a time, the last tile of fewer than 16 through a scratch
// tile.
FASTRNN_TILE_TARGET void tile_products(int64_t R, const uint16_t* a, int64_t kp,
                                       const uint16_t* b, int64_t jt, float* c, int64_t ldc,
                                       bool acc) {
  const int64_t ks = kp / kTileDepth, bs = ks * kTileB, full = R / kTileRows;
  const int64_t rest = R - full * kTileRows;
  alignas(64) float tmp[kTileRows * 2 * kTileCols];
  configure();
  for (int64_t j = 0; j < jt; j += 2) {
    const uint16_t* bj = b + j * bs;
    float* cj = c + j * kTileCols;
    const bool two = j + 2 <= jt;
    int64_t r = 0;
    for (; r + 2 <= full; r += 2) {
      float* cr = cj + r * kTileRows * ldc;
      if (two) tile_block<2, 2>(a + r * kTileRows * kp, kp, bj, bs, ks, cr, ldc, acc);
      else tile_block<2, 1>(a + r * kTileRows * kp, kp, bj, bs, ks, cr, ldc, acc);
    }
    if (r < full) {
      float* cr = cj + r * kTileRows * ldc;
      if (two) tile_block<1, 2>(a + r * kTileRows * kp, kp, bj, bs, ks, cr, ldc, acc);
      else tile_block<1, 1>(a + r * kTileRows * kp, kp, bj, bs, ks, cr, ldc, acc);
    }
    if (rest > 0) {
      const int64_t w = two ? 2 * kTileCols : kTileCols;
      float* cr = cj + full * kTileRows * ldc;
      if (two) tile_block<1, 2>(a + full * kTileRows * kp, kp, bj, bs, ks, tmp, 2 * kTileCols, false);
      else tile_block<1, 1>(a + full * kTileRows * kp, kp, bj, bs, ks, tmp, 2 * kTileCols, false);
      for (int64_t q = 0; q < rest; ++q) {
        if (acc)
          for (int64_t v = 0; v < w; ++v) cr[q * ldc + v] += tmp[q * 2 * kTileCols + v];
        else
          std::memcpy(cr + q * ldc, tmp + q * 2 * kTileCols, sizeof(float) * w);
      }
    }
  }
  _tile_release();
}

// The same products without tiles, where the processor has AVX512-BF16
// but no AMX (AMD from Zen 4 on, Intel Cooper Lake): VDPBF16PS takes a
// vector of 16 column pairs of b, one row of a tile of the packed
// weights as it stands, against a's pair (k, k + 1) broadcast, and adds
// both products to each column's float32 sum, 32 multiply-adds an
// instruction where an FMA does 16. RB rows by CT column tiles of c
// (rows ldc apart) from a (rows kp apart), b's column tiles bs apart,
// pairs p0 to p1; c += the sums from zero where accumulating, as
// tile_block().
template <int RB, int CT>
FASTRNN_DOT_TARGET inline void dot_block(const uint16_t* a, int64_t kp, const uint16_t* b,
                                         int64_t bs, int64_t p0, int64_t p1, float* c, int64_t ldc,
                                         bool accumulate) {
  __m512 acc[RB][CT];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < CT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    __m512bh bv[CT];
    for (int t = 0; t < CT; ++t)
      bv[t] = (__m512bh)_mm512_loadu_si512(b + t * bs + p * 2 * kTileCols);
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * kp + 2 * p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int t = 0; t < CT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], av, bv[t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < CT; ++t) {
      float* out = c + r * ldc + t * kTileCols;
      const __m512 sum = acc[r][t];
      _mm512_storeu_ps(out, accumulate ? _mm512_add_ps(_mm512_loadu_ps(out), sum) : sum);
    }
}

// Rows in blocks of kDotRows by two column tiles: 24 accumulators and the
// two tiles' vectors of a pair in AVX-512's 32 registers.
constexpr int kDotRows = 12;

// dot_block() of n <= kDotRows rows.
template <int CT, int RB = kDotRows>
FASTRNN_DOT_TARGET inline void dot_rest(int64_t n, const uint16_t* a, int64_t kp, const uint16_t* b,
                                        int64_t bs, int64_t p0, int64_t p1, float* c, int64_t ldc,
                                        bool acc) {
  if (n == RB) return dot_block<RB, CT>(a, kp, b, bs, p0, p1, c, ldc, acc);
  if constexpr (RB > 1) dot_rest<CT, RB - 1>(n, a, kp, b, bs, p0, p1, c, ldc, acc);
}

// tile_products() with VDPBF16PS: the same operands and results, column
// tiles outermost two at a time, so that their weights are read once a
// step and then from L1 for every block of rows. The rows in as few blocks
// as kDotRows allows, as even as they go (64: 11, 11, 11, 11, 10, 10),
// where a last block of the rest (64: five of 12 and one of 4) has too few
// sums to hide the instruction's latency behind. The columns of t's
// blocks that sum one part alone run over that part's pairs only (the
// pair that holds the last of x and the first of h where C is odd, in
// both), so that the two blocks of the GRU's new gate take the depth once
// between them rather than twice; the rest is zeros of the weights, whose
// products add nothing to a sum. The column tiles of a pair in two such
// ranges run one at a time.
FASTRNN_DOT_TARGET void dot_products(int64_t R, const uint16_t* a, int64_t kp, const uint16_t* b,
                                     int64_t jt, float* c, int64_t ldc, bool acc,
                                     const TileProducts& t) {
  const int64_t np = kp / 2, bs = kp * kTileCols;
  const int64_t blocks = (R + kDotRows - 1) / kDotRows;
  // Column tile j's first pair, and the pair past its last.
  const auto first = [&](int64_t j) {
    const int64_t col = j * kTileCols;
    return col < t.input_from && col >= t.hidden_from ? t.C / 2 : 0;
  };
  const auto last = [&](int64_t j) { return j * kTileCols >= t.input_from ? (t.C + 1) / 2 : np; };
  const auto run = [&](auto ct, int64_t j, int64_t p0, int64_t p1) {
    constexpr int CT = decltype(ct)::value;
    for (int64_t i = 0, r = 0; i < blocks; ++i) {
      const int64_t n = R / blocks + (i < R % blocks);
      dot_rest<CT>(n, a + r * kp, kp, b + j * bs, bs, p0, p1, c + r * ldc + j * kTileCols, ldc,
                   acc);
      r += n;
    }
  };
  for (int64_t j = 0; j < jt; j += 2) {
    const int64_t p0 = first(j), p1 = last(j);
    if (j + 2 <= jt && first(j + 1) == p0 && last(j + 1) == p1) {
      run(std::integral_constant<int, 2>{}, j, p0, p1);
    } else {
      run(std::integral_constant<int, 1>{}, j, p0, p1);
      if (j + 1 < jt) run(std::integral_constant<int, 1>{}, j + 1, first(j + 1), last(j + 1));
    }
  }
}

bool os_allows_tiles() {
  // Linux gives a process the tile registers' state only once asked for it
  // (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  constexpr long kRequestPermission = 0x1023, kTileData = 18;
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

// The AVX-512 kernels, which run the cell's step on the products.
bool cpu_has_step() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

bool cpu_has_dot() { return __builtin_cpu_supports("avx512bf16") && cpu_has_step(); }

bool cpu_has_tiles() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
  return amx_bf16 && amx_tile && cpu_has_step();
}

// This thread's rows of a product's left side ([x | h], or dgh) in
// bfloat16, grown as needed and freed with the thread.
struct RowBuffer {
  uint16_t* p = nullptr;
  int64_t n = 0;
  ~RowBuffer() { std::free(p); }
};

uint16_t* thread_rows(int64_t n) {
  thread_local RowBuffer rows;
  if (rows.n < n) {
    std::free(rows.p);
    rows.p = static_cast<uint16_t*>(std::aligned_alloc(64, (n * 2 + 63) / 64 * 64));
    TORCH_CHECK(rows.p != nullptr, "fastrnn: out of memory for a bfloat16 step's rows");
    rows.n = n;
  }
  return rows.p;
}

#endif  // FASTRNN_TILES

enum class Unit { none, amx, dot };

Unit unit() {
#if FASTRNN_TILES
  static const Unit u = cpu_has_tiles() && os_allows_tiles() ? Unit::amx
                        : cpu_has_dot()                       ? Unit::dot
                                                              : Unit::none;
  return u;
#else
  return Unit::none;
#endif
}

}  // namespace

bool tiles_available() { return unit() != Unit::none; }

const char* tile_unit() {
  switch (unit()) {
    case Unit::amx: return "amx";
    case Unit::dot: return "avx512_bf16";
    default: return "none";
  }
}

int64_t tile_depth(int64_t C, int64_t P) {
  return (C + P + kTileDepth - 1) / kTileDepth * kTileDepth;
}

void tile_pack(const float* w_ih, const float* w_hh, int64_t G, int64_t apart, int64_t bs,
               int64_t J, int64_t Jp, int64_t C, int64_t P, int64_t kp, uint16_t* out, int64_t c0,
               int64_t c1) {
  const int64_t summed = G - apart;
  // A column tile's 16 columns as rows of kp (zeros where a column has no
  // weight), then written pair by pair of rows, in the order of the tile.
  std::vector<float> cols(kTileCols * kp);
  for (int64_t t0 = c0; t0 < c1; t0 += kTileCols) {
    std::fill(cols.begin(), cols.end(), 0.f);
    for (int64_t q = 0; q < kTileCols; ++q) {
      const int64_t col = t0 + q, blk = col / Jp, j = col % Jp;
      if (j >= J) continue;
      float* row = cols.data() + q * kp;
      const int64_t gate = blk < G ? blk : summed + blk - G;
      if (blk < summed || blk >= G) std::memcpy(row, w_ih + (gate * bs + j) * C, sizeof(float) * C);
      if (blk < G) std::memcpy(row + C, w_hh + (gate * bs + j) * P, sizeof(float) * P);
    }
    write_tile_columns(cols.data(), kp, out + t0 * kp);
  }
}

void tile_pack_rows(const float* w, int64_t ldw, int64_t K, int64_t J, int64_t kp, uint16_t* out,
                    int64_t c0, int64_t c1) {
  std::vector<float> cols(kTileCols * kp);
  for (int64_t t0 = c0; t0 < c1; t0 += kTileCols) {
    std::fill(cols.begin(), cols.end(), 0.f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t q = 0; q < kTileCols && t0 + q < J; ++q) cols[q * kp + k] = w[k * ldw + t0 + q];
    write_tile_columns(cols.data(), kp, out + t0 * kp);
  }
}

#if FASTRNN_TILES
namespace {
// A product's left side for tile_products(): R rows of the calling
// thread's buffer, each the bfloat16 of one span of a (na wide, rows lda
// apart) and, where nh > 0, one of h (nh wide, rows ldh apart), padded with
// zeros to kp; then zero rows to a whole tile.
const uint16_t* left_rows(int64_t R, int64_t kp, const float* a, int64_t lda, int64_t na,
                          const float* h = nullptr, int64_t ldh = 0, int64_t nh = 0) {
  const int64_t Rp = (R + kTileRows - 1) / kTileRows * kTileRows;
  uint16_t* rows = thread_rows(Rp * kp);
  for (int64_t r = 0; r < R; ++r) {
    uint16_t* row = rows + r * kp;
    to_bf16_row(a + r * lda, na, row);
    if (nh > 0) to_bf16_row(h + r * ldh, nh, row + na);
    std::memset(row + na + nh, 0, sizeof(uint16_t) * (kp - na - nh));
  }
  std::memset(rows + R * kp, 0, sizeof(uint16_t) * (Rp - R) * kp);
  return rows;
}

// c (R x jt column tiles) = a b, or c += that, on the unit unit() found;
// t: where b's blocks sum one part alone.
void products(int64_t R, const uint16_t* a, int64_t kp, const uint16_t* b, int64_t jt, float* c,
              int64_t ldc, bool accumulate, const TileProducts& t) {
  if (unit() == Unit::amx) tile_products(R, a, kp, b, jt, c, ldc, accumulate);
  else dot_products(R, a, kp, b, jt, c, ldc, accumulate, t);
}
}  // namespace
#endif

void tile_gemm(const TileProducts& t, int64_t d, int64_t R, const float* a, int64_t lda, int64_t K,
               float* c, int64_t ldc, bool accumulate) {
#if FASTRNN_TILES
  products(R, left_rows(R, t.kp, a, lda, K), t.kp, t.b[d], t.ldg / kTileCols, c, ldc, accumulate,
           TileProducts{});
#else
  (void)t, (void)d, (void)R, (void)a, (void)lda, (void)K, (void)c, (void)ldc, (void)accumulate;
#endif
}

void tile_step(const TileProducts& t, int64_t d, int64_t R, const float* x, int64_t ldx,
               const float* h, int64_t ldh, float* gates, int64_t ldg) {
#if FASTRNN_TILES
  products(R, left_rows(R, t.kp, x, ldx, t.C, h, ldh, t.P), t.kp, t.b[d], ldg / kTileCols, gates,
           ldg, false, t);
#else
  (void)t, (void)d, (void)R, (void)x, (void)ldx, (void)h, (void)ldh, (void)gates, (void)ldg;
#endif
}

}  // namespace cpu
}  // namespace fastrnn
