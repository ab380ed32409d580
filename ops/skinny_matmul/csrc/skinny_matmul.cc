// Matmul of a few rows by a Linear weight, for mindport's "cpu" backend (ops.Custom, func_type="aot").
//
//   SkinnyMatmul(x f32[M,K], weight f32[N,K]) -> y f32[M,N] = x weight^T,   1 <= M <= kMaxRows
//
// While decoding, M (the batch) is small and the product is bound by reading the weight once.
// Each weight row is streamed once, several rows at a time, and dotted with all M rows of x (which
// stay in L1): AVX-512 or AVX2 + FMA when the processor has them, plain C++ otherwise. Rows of
// the weight are split over the operators' kept threads (parallel_for.h) unless the product is too
// small to pay for handing work over. Float32 sums in another order than MatMul's: results agree
// to rounding.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "aot_export.h"
#include "parallel_for.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxRows = 8;
constexpr double kThreadFlops = 2e5;  // smaller products run on the calling thread (a 100K-float weight at M = 1)

// y[i, j] for weight rows j in [j0, j1): plain C++ (any processor).
void RowsPlain(const float *x, int64_t m, const float *w, int64_t k, float *y, int64_t n, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t i = 0; i < m; ++i) {
      float s = 0.0f;
      for (int64_t q = 0; q < k; ++q) s += x[i * k + q] * w[j * k + q];
      y[i * n + j] = s;
    }
}

#if defined(__x86_64__)
// Weight rows streamed together by the AVX-512 loop for M rows of x: as many as the 32 vector registers
// hold beside their R * M accumulators (8 at M = 1: eight streams in flight keep a core at the memory's
// rate where two reached ~25 GB/s of ~35).
constexpr int StreamedRows(int m) { return std::max(2, std::min(8, 24 / (m + 1))); }

// M rows of x against weight rows [j0, j1), R weight rows at a time (each x load feeds R FMAs), 16 lanes;
// M and R are template parameters so that the R * M accumulators stay in registers. Rows left over
// from the blocks of R run one at a time.
template <int M, int R = StreamedRows(M)>
__attribute__((target("avx512f"))) void RowsAvx512(const float *x, int64_t k, const float *w, float *y, int64_t n,
                                                   int64_t j0, int64_t j1) {
  const int64_t body = k - k % 16;
  int64_t j = j0;
  for (; j + R <= j1; j += R) {
    const float *wj = w + j * k;
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t q = 0; q < body; q += 16) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(wj + r * k + q);
      for (int i = 0; i < M; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * k + q);
        for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(xv, wv[r], acc[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < M; ++i) {
        float s = _mm512_reduce_add_ps(acc[r][i]);
        for (int64_t q = body; q < k; ++q) s += x[i * k + q] * wj[r * k + q];
        y[i * n + j + r] = s;
      }
  }
  if constexpr (R > 1) {
    if (j < j1) RowsAvx512<M, 1>(x, k, w, y, n, j, j1);
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void RowsAvx2(const float *x, int64_t k, const float *w, float *y, int64_t n,
                                                  int64_t j0, int64_t j1) {
  const int64_t body = k - k % 8;
  for (int64_t j = j0; j < j1; ++j) {
    const float *wj = w + j * k;
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t q = 0; q < body; q += 8) {
      const __m256 wv = _mm256_loadu_ps(wj + q);
      for (int i = 0; i < M; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + q), wv, acc[i]);
    }
    for (int i = 0; i < M; ++i) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[i]);
      float s = 0.0f;
      for (float v : lanes) s += v;
      for (int64_t q = body; q < k; ++q) s += x[i * k + q] * wj[q];
      y[i * n + j] = s;
    }
  }
}

using RowsFn = void (*)(const float *, int64_t, const float *, float *, int64_t, int64_t, int64_t);

template <int M>
struct Avx512 {
  static constexpr RowsFn fn = RowsAvx512<M>;
};
template <int M>
struct Avx2 {
  static constexpr RowsFn fn = RowsAvx2<M>;
};

template <template <int> class K>
RowsFn Pick(int64_t m) {
  static const RowsFn table[kMaxRows] = {K<1>::fn, K<2>::fn, K<3>::fn, K<4>::fn,
                                         K<5>::fn, K<6>::fn, K<7>::fn, K<8>::fn};
  return table[m - 1];
}

RowsFn Vectorized(int64_t m) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512) return Pick<Avx512>(m);
  if (avx2) return Pick<Avx2>(m);
  return nullptr;
}
#endif

bool IsF32(const char *dtype) { return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0; }

}  // namespace

extern "C" {

int SkinnyMatmulBody(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || !IsF32(dtypes[0]) || !IsF32(dtypes[1])) return 1;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (shapes[1][1] != k || m < 1 || m > kMaxRows) return 2;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int threads = mindport::ThreadsFor(2.0 * m * n * k, kThreadFlops);
  const int64_t chunk = std::max<int64_t>(8, n / (4 * threads) / 8 * 8);  // whole blocks of the row loop
  mindport::ParallelFor(n, threads, chunk, [&](int64_t j0, int64_t j1) {
#if defined(__x86_64__)
    if (RowsFn fn = Vectorized(m)) {
      fn(x, k, w, y, n, j0, j1);
      return;
    }
#endif
    RowsPlain(x, m, w, k, y, n, j0, j1);
  });
  return 0;
}

MINDPORT_EXPORT(SkinnyMatmul)

}  // extern "C"
