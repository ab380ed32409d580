// Matmul of a few rows by a Linear weight, for mindport's "cpu" backend (ops.Custom, func_type="aot").
//
//   SkinnyMatmul(x f32[M,K], weight f32[N,K]) -> y f32[M,N] = x weight^T,   1 <= M <= kMaxRows
//
// While decoding, M (the batch) is small and the product is bound by reading the weight once.
// Each weight row is streamed once, two rows at a time, and dotted with all M rows of x (which
// stay in L1): AVX-512 or AVX2 + FMA when the processor has them, plain C++ otherwise. Rows of
// the weight are split over threads only when the product is large enough to pay for starting
// them. Float32 sums in another order than MatMul's: results agree to rounding.

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
constexpr double kThreadFlops = 2e6;  // smaller products run on the calling thread

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
// M rows of x against weight rows [j0, j1), two weight rows at a time (each x load feeds two FMAs),
// 16 lanes; M is a template parameter so that the 2 M accumulators stay in registers.
template <int M>
__attribute__((target("avx512f"))) void RowsAvx512(const float *x, int64_t k, const float *w, float *y, int64_t n,
                                                   int64_t j0, int64_t j1) {
  const int64_t body = k - k % 16;
  int64_t j = j0;
  for (; j + 2 <= j1; j += 2) {
    const float *w0 = w + j * k, *w1 = w0 + k;
    __m512 a0[M], a1[M];
    for (int i = 0; i < M; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    for (int64_t q = 0; q < body; q += 16) {
      const __m512 v0 = _mm512_loadu_ps(w0 + q), v1 = _mm512_loadu_ps(w1 + q);
      for (int i = 0; i < M; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * k + q);
        a0[i] = _mm512_fmadd_ps(xv, v0, a0[i]);
        a1[i] = _mm512_fmadd_ps(xv, v1, a1[i]);
      }
    }
    for (int i = 0; i < M; ++i) {
      float s0 = _mm512_reduce_add_ps(a0[i]), s1 = _mm512_reduce_add_ps(a1[i]);
      for (int64_t q = body; q < k; ++q) {
        s0 += x[i * k + q] * w0[q];
        s1 += x[i * k + q] * w1[q];
      }
      y[i * n + j] = s0;
      y[i * n + j + 1] = s1;
    }
  }
  if (j < j1) RowsPlain(x, M, w, k, y, n, j, j1);
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
  mindport::ParallelFor(n, threads, std::max<int64_t>(1, n / (4 * threads)), [&](int64_t j0, int64_t j1) {
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
