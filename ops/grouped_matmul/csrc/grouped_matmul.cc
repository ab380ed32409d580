// Grouped expert matmul for mindport's "cpu" backend (MindSpore ops.Custom, func_type="aot").
//
//   GroupedMatmul(x f32[N,K], weight f32[E,F,K], group_sizes i32[E]) -> y f32[N,F]
//       rows [o_e, o_e + n_e) of x (o_e = n_0 + ... + n_{e-1}) times weight[e]^T; rows from
//       sum(n_e) on are zero (dropped slots). Negative sizes count as 0; the sum is cut at N.
//   GroupedMatmulBackward(dy f32[N,F], x, weight, group_sizes) -> dx f32[N,K], dweight f32[E,F,K]
//       dx rows of group e = dy_e weight[e]; dweight[e] = dy_e^T x_e (zero for an empty expert).
//
// All three products are one blocked GEMM, C[M,N] = A[M,P] B[P,N] with strided A and B: a 6x16
// register tile (AVX2 + FMA when the processor has them, plain C++ otherwise) over a 16-column
// panel of B packed once per task; tasks are (expert, 16-column panel) pairs spread over threads.
// A group of fewer than 6 rows whose A and B are contiguous along P (the forward while decoding)
// takes dot products instead: packing would copy the whole weight for a memory-bound product.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot_export.h"
#include "parallel_for.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int kRows = 6;   // tile rows of C
constexpr int kCols = 16;  // tile columns of C (one packed panel of B)

// A(m, p) = a[m * am + p * ap]; B(p, n) = b[p * bp + n * bn]; C row-major with leading dimension ldc.
struct Gemm {
  const float *a;
  int64_t am, ap;
  const float *b;
  int64_t bp, bn;
  float *c;
  int64_t ldc;
  int64_t m, n, p;
};

void TilePlain(const float *a, int64_t am, int64_t ap, const float *panel, int64_t p, int rows, float *c,
               int64_t ldc, int cols) {
  float acc[kRows][kCols] = {};
  for (int64_t q = 0; q < p; ++q) {
    const float *bq = panel + q * kCols;
    for (int i = 0; i < rows; ++i) {
      float av = a[i * am + q * ap];
      for (int j = 0; j < kCols; ++j) acc[i][j] += av * bq[j];
    }
  }
  for (int i = 0; i < rows; ++i) std::memcpy(c + i * ldc, acc[i], cols * sizeof(float));
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void TileAvx2(const float *a, int64_t am, int64_t ap, const float *panel,
                                                  int64_t p, int rows, float *c, int64_t ldc, int cols) {
  const float *row[kRows];
  for (int i = 0; i < kRows; ++i) row[i] = a + std::min(i, rows - 1) * am;  // short tiles repeat the last row
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t q = 0; q < p; ++q) {
    __m256 b0 = _mm256_loadu_ps(panel + q * kCols), b1 = _mm256_loadu_ps(panel + q * kCols + 8);
    int64_t off = q * ap;
    __m256 x;
    x = _mm256_broadcast_ss(row[0] + off), c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(row[1] + off), c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(row[2] + off), c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(row[3] + off), c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(row[4] + off), c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(row[5] + off), c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  alignas(32) float tile[kRows][kCols];
  __m256 acc[kRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < rows; ++i) {
    if (cols == kCols) {
      _mm256_storeu_ps(c + i * ldc, acc[i][0]);
      _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
    } else {
      _mm256_store_ps(tile[i], acc[i][0]);
      _mm256_store_ps(tile[i] + 8, acc[i][1]);
      std::memcpy(c + i * ldc, tile[i], cols * sizeof(float));
    }
  }
}

__attribute__((target("avx2,fma"))) float DotAvx2(const float *a, const float *b, int64_t p) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t q = 0;
  for (; q + 16 <= p; q += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + q), _mm256_loadu_ps(b + q), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + q + 8), _mm256_loadu_ps(b + q + 8), s1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
  float sum = 0.0f;
  for (float v : lanes) sum += v;
  for (; q < p; ++q) sum += a[q] * b[q];
  return sum;
}

bool HaveAvx2() {
  static const bool have = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return have;
}
#endif

float Dot(const float *a, const float *b, int64_t p) {
#if defined(__x86_64__)
  if (HaveAvx2()) return DotAvx2(a, b, p);
#endif
  float sum = 0.0f;
  for (int64_t q = 0; q < p; ++q) sum += a[q] * b[q];
  return sum;
}

bool ByDots(const Gemm &g) { return g.m < kRows && g.ap == 1 && g.bp == 1; }

// Columns [n0, n0 + 16) of C = A B as dot products (see ByDots).
void GemmDots(const Gemm &g, int64_t n0) {
  for (int64_t j = n0; j < std::min(g.n, n0 + kCols); ++j)
    for (int64_t i = 0; i < g.m; ++i) g.c[i * g.ldc + j] = Dot(g.a + i * g.am, g.b + j * g.bn, g.p);
}

// Columns [n0, n0 + 16) of C = A B (all M rows); panel is scratch of p * 16 floats.
void GemmPanel(const Gemm &g, int64_t n0, float *panel) {
  int cols = (int)std::min<int64_t>(kCols, g.n - n0);
  for (int64_t q = 0; q < g.p; ++q) {
    float *dst = panel + q * kCols;
    for (int j = 0; j < cols; ++j) dst[j] = g.b[q * g.bp + (n0 + j) * g.bn];
    for (int j = cols; j < kCols; ++j) dst[j] = 0.0f;
  }
  for (int64_t m0 = 0; m0 < g.m; m0 += kRows) {
    int rows = (int)std::min<int64_t>(kRows, g.m - m0);
    const float *a = g.a + m0 * g.am;
    float *c = g.c + m0 * g.ldc + n0;
#if defined(__x86_64__)
    if (HaveAvx2()) {
      TileAvx2(a, g.am, g.ap, panel, g.p, rows, c, g.ldc, cols);
      continue;
    }
#endif
    TilePlain(a, g.am, g.ap, panel, g.p, rows, c, g.ldc, cols);
  }
}

// Every GEMM of `gemms` (zero-filled where P == 0), split into (gemm, panel) tasks over threads.
void RunGemms(const std::vector<Gemm> &gemms) {
  std::vector<std::pair<int, int64_t>> tasks;
  int64_t max_p = 0;
  double flops = 0;
  for (int i = 0; i < (int)gemms.size(); ++i) {
    const Gemm &g = gemms[i];
    if (g.m == 0) continue;
    if (g.p == 0) {
      for (int64_t r = 0; r < g.m; ++r) std::memset(g.c + r * g.ldc, 0, g.n * sizeof(float));
      continue;
    }
    for (int64_t n0 = 0; n0 < g.n; n0 += kCols) tasks.emplace_back(i, n0);
    max_p = std::max(max_p, g.p);
    flops += 2.0 * g.m * g.n * g.p;
  }
  int threads = mindport::ThreadsFor(flops, 4e6);
  mindport::ParallelFor((int64_t)tasks.size(), threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(max_p * kCols);
    for (int64_t t = begin; t < end; ++t) {
      const Gemm &g = gemms[tasks[t].first];
      if (ByDots(g)) {
        GemmDots(g, tasks[t].second);
      } else {
        GemmPanel(g, tasks[t].second, panel.data());
      }
    }
  });
}

// Group offsets from the sizes: sizes below 0 count as 0 and the groups are cut at n rows.
std::vector<int64_t> Offsets(const int32_t *sizes, int64_t e, int64_t n) {
  std::vector<int64_t> off(e + 1, 0);
  for (int64_t i = 0; i < e; ++i) off[i + 1] = std::min(n, off[i] + std::max<int64_t>(0, sizes[i]));
  return off;
}

bool AllF32(int count, const char **dtypes) {
  for (int i = 0; i < count; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  return true;
}

}  // namespace

extern "C" {

int GroupedMatmulBody(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 3 || ndims[2] != 1 || !AllF32(1, dtypes) ||
      !AllF32(1, dtypes + 1) || std::strcmp(dtypes[2], "int32") != 0)
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const int32_t *sizes = static_cast<const int32_t *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  int64_t n = shapes[0][0], k = shapes[0][1], e = shapes[1][0], f = shapes[1][1];
  if (shapes[1][2] != k || shapes[2][0] != e) return 2;
  std::vector<int64_t> off = Offsets(sizes, e, n);
  std::vector<Gemm> gemms;
  for (int64_t i = 0; i < e; ++i)  // y_e = x_e w_e^T: A = x_e (rows), B(k, f) = w[e, f, k]
    gemms.push_back({x + off[i] * k, k, 1, w + i * f * k, 1, k, y + off[i] * f, f, off[i + 1] - off[i], f, k});
  RunGemms(gemms);
  std::memset(y + off[e] * f, 0, (n - off[e]) * f * sizeof(float));
  return 0;
}

int GroupedMatmulBackwardBody(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  if (nparam != 6 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 3 || ndims[3] != 1 || !AllF32(3, dtypes) ||
      std::strcmp(dtypes[3], "int32") != 0)
    return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const int32_t *sizes = static_cast<const int32_t *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  float *dw = static_cast<float *>(params[5]);
  int64_t n = shapes[1][0], k = shapes[1][1], e = shapes[2][0], f = shapes[2][1];
  if (shapes[0][0] != n || shapes[0][1] != f || shapes[2][2] != k || shapes[3][0] != e) return 2;
  std::vector<int64_t> off = Offsets(sizes, e, n);
  std::vector<Gemm> gemms;
  for (int64_t i = 0; i < e; ++i) {
    int64_t rows = off[i + 1] - off[i];
    // dx_e = dy_e w_e: A = dy_e, B(f, k) = w[e, f, k]
    gemms.push_back({dy + off[i] * f, f, 1, w + i * f * k, k, 1, dx + off[i] * k, k, rows, k, f});
    // dw_e = dy_e^T x_e: A(f, r) = dy[r, f], B(r, k) = x[r, k]; P = rows (0: zeros)
    gemms.push_back({dy + off[i] * f, 1, f, x + off[i] * k, k, 1, dw + i * f * k, k, f, k, rows});
  }
  RunGemms(gemms);
  std::memset(dx + off[e] * k, 0, (n - off[e]) * k * sizeof(float));
  return 0;
}

MINDPORT_EXPORT(GroupedMatmul)
MINDPORT_EXPORT(GroupedMatmulBackward)

}  // extern "C"
