// Grouped expert matmul for mindport's "cpu" backend (MindSpore ops.Custom, func_type="aot").
//
//   GroupedMatmul(x f32[N,K], weight f32[E,F,K], group_sizes i32[E]) -> y f32[N,F]
//       rows [o_e, o_e + n_e) of x (o_e = n_0 + ... + n_{e-1}) times weight[e]^T; rows from
//       sum(n_e) on are zero (dropped slots). Negative sizes count as 0; the sum is cut at N.
//   GroupedMatmulBackward(dy f32[N,F], x, weight, group_sizes) -> dx f32[N,K], dweight f32[E,F,K]
//       dx rows of group e = dy_e weight[e]; dweight[e] = dy_e^T x_e (zero for an empty expert).
//   GroupedMatmulForceIsa(isa) -> 0, or 1 if the processor lacks it: kernels of instruction set
//       isa (0 generic, 1 AVX2 + FMA, 2 AVX-512; -1 the best the processor has), for tests.
//
// All three products are one blocked GEMM, C[M,N] = A[M,P] B[P,N] with strided A and B. One kernel
// template over the vector width W (GCC vector extensions) compiles to AVX-512 (W 16), AVX2 + FMA
// (W 8) or the baseline (W 4) by the target of the function it is inlined into; the best one the
// processor has is chosen at run time. A task is an (expert GEMM, NR-column panel) pair, spread
// over threads: it packs B's panel one K block at a time (kPanelFloats, L1-sized; the forward's
// weight by W x W register transposes) and runs an MR x NR register tile (NR = NV vectors; half
// the height for a short last tile) down all M rows, adding each K block into C.
// A group of fewer than kDotMaxRows rows whose A and B are contiguous along P (the forward while
// decoding) takes dot products instead: each weight row is read once, nothing is packed.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "aot_export.h"
#include "parallel_for.h"

// Vectors pass by value only between always-inlined functions, inside one instruction set's entry.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

constexpr int64_t kPanelFloats = 8192;  // a packed K block of B's panel: 32 KiB, within L1
constexpr int kDotMaxRows = 8;           // smaller groups with contiguous A and B take dot products

// W floats in one vector register; unaligned, may alias the float arrays it is loaded from.
template <int W>
struct Lanes {
  typedef float V __attribute__((vector_size(4 * W), aligned(4), may_alias));
};

template <int W>
using Vec = typename Lanes<W>::V;

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

// C[rows, cols] (+)= A[rows, p] panel[p, NR], one MR x NR register tile (NR = NV * W); add to C
// when `accumulate` (K blocks after the first). A short tile repeats its last row of A; the panel
// is zero past `cols` and those columns are not stored.
template <int W, int MR, int NV>
__attribute__((always_inline)) inline void Tile(const float *a, int64_t am, int64_t ap, const float *panel, int64_t p,
                                                int rows, float *c, int64_t ldc, int cols, bool accumulate) {
  using V = Vec<W>;
  constexpr int NR = NV * W;
  const float *row[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) row[i] = a + std::min(i, rows - 1) * am;
  V acc[MR][NV] = {};
  float edge[NR] = {};  // one row of C where cols < NR
  if (accumulate) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      if (i >= rows) break;
      const float *src = c + i * ldc;
      if (cols < NR) src = static_cast<const float *>(std::memcpy(edge, src, cols * sizeof(float)));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = *reinterpret_cast<const V *>(src + v * W);
    }
  }
  for (int64_t q = 0; q < p; ++q) {
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V *>(panel + q * NR + v * W);
    const int64_t off = q * ap;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float x = row[i][off];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += x * b[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
    float *dst = cols < NR ? edge : c + i * ldc;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V *>(dst + v * W) = acc[i][v];
    if (cols < NR) std::memcpy(c + i * ldc, edge, cols * sizeof(float));
  }
}

// Transposes the W x W block r in registers (r[i][l] -> r[l][i]): log2(W) perfect shuffles.
template <int W, int... L>
__attribute__((always_inline)) inline void Transpose(Vec<W> *r, std::integer_sequence<int, L...>) {
  for (int round = 1; round < W; round *= 2) {
    Vec<W> t[W];
#pragma GCC unroll 16
    for (int i = 0; i < W / 2; ++i) {
      t[2 * i] = __builtin_shufflevector(r[i], r[i + W / 2], (L % 2 ? W + L / 2 : L / 2)...);
      t[2 * i + 1] = __builtin_shufflevector(r[i], r[i + W / 2], (L % 2 ? W + W / 2 + L / 2 : W / 2 + L / 2)...);
    }
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r[i] = t[i];
  }
}

// panel[q * NR + j] = b[q + j * bn] for q < depth, j < cols (B contiguous along P, the forward's
// weight rows): W x W blocks transposed in registers, the edges one float at a time.
template <int W, int NR>
__attribute__((always_inline)) inline void PackTransposed(const float *b, int64_t bn, int64_t depth, int cols,
                                                          float *panel) {
  using V = Vec<W>;
  const int block_cols = cols - cols % W;
  const int64_t block_depth = depth - depth % W;
  for (int j0 = 0; j0 < block_cols; j0 += W)
    for (int64_t q0 = 0; q0 < block_depth; q0 += W) {
      V r[W];
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) r[i] = *reinterpret_cast<const V *>(b + (j0 + i) * bn + q0);
      Transpose<W>(r, std::make_integer_sequence<int, W>());
#pragma GCC unroll 16
      for (int l = 0; l < W; ++l) *reinterpret_cast<V *>(panel + (q0 + l) * NR + j0) = r[l];
    }
  for (int j = 0; j < cols; ++j)
    for (int64_t q = j < block_cols ? block_depth : 0; q < depth; ++q) panel[q * NR + j] = b[q + j * bn];
}

// Columns [n0, n0 + NR) of C = A B, all M rows; panel is scratch of kPanelFloats.
template <int W, int MR, int NV>
__attribute__((always_inline)) inline void GemmPanel(const Gemm &g, int64_t n0, float *panel) {
  constexpr int NR = NV * W;
  constexpr int64_t kc = kPanelFloats / NR;
  const int cols = (int)std::min<int64_t>(NR, g.n - n0);
  for (int64_t k0 = 0; k0 < g.p; k0 += kc) {
    const int64_t depth = std::min(kc, g.p - k0);
    const float *b = g.b + k0 * g.bp + n0 * g.bn;
    if (cols < NR) std::memset(panel, 0, depth * NR * sizeof(float));
    if (g.bn == 1) {
      for (int64_t q = 0; q < depth; ++q) std::memcpy(panel + q * NR, b + q * g.bp, cols * sizeof(float));
    } else {  // g.bp == 1
      PackTransposed<W, NR>(b, g.bn, depth, cols, panel);
    }
    for (int64_t m0 = 0; m0 < g.m; m0 += MR) {
      const int rows = (int)std::min<int64_t>(MR, g.m - m0);
      const float *a = g.a + m0 * g.am + k0 * g.ap;
      float *c = g.c + m0 * g.ldc + n0;
      if (2 * rows <= MR) {  // a short last tile: half the height wastes half the FMAs
        Tile<W, MR / 2, NV>(a, g.am, g.ap, panel, depth, rows, c, g.ldc, cols, k0 > 0);
      } else {
        Tile<W, MR, NV>(a, g.am, g.ap, panel, depth, rows, c, g.ldc, cols, k0 > 0);
      }
    }
  }
}

// The half of v starting at lane `first`.
template <int W, int First, int... L>
__attribute__((always_inline)) inline Vec<W / 2> Half(const Vec<W> &v, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(v, v, (First + L)...);
}

// v[0] + ... + v[W - 1], as a tree of halves (log2(W) dependent adds, not W).
template <int W>
__attribute__((always_inline)) inline float SumLanes(const Vec<W> &v) {
  if constexpr (W == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    constexpr auto lanes = std::make_integer_sequence<int, W / 2>();
    return SumLanes<W / 2>(Half<W, 0>(v, lanes) + Half<W, W / 2>(v, lanes));
  }
}

// out[i * ldc] = dot(rows[i], b) over p, for R rows at once (each vector of b loaded once).
template <int W, int R>
__attribute__((always_inline)) inline void DotRows(const float *const *rows, const float *b, int64_t p, float *out,
                                                   int64_t ldc) {
  using V = Vec<W>;
  V acc[R] = {};
  int64_t q = 0;
  for (; q + W <= p; q += W) {
    const V bv = *reinterpret_cast<const V *>(b + q);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) acc[i] += *reinterpret_cast<const V *>(rows[i] + q) * bv;
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    float sum = SumLanes<W>(acc[i]);
    for (int64_t t = q; t < p; ++t) sum += rows[i][t] * b[t];
    out[i * ldc] = sum;
  }
}

bool ByDots(const Gemm &g) { return g.m < kDotMaxRows && g.ap == 1 && g.bp == 1; }

// Columns [n0, n0 + width) of C = A B as dot products (see ByDots): rows in passes of 4, 2, 1.
template <int W>
__attribute__((always_inline)) inline void GemmDots(const Gemm &g, int64_t n0, int64_t width) {
  const float *rows[kDotMaxRows];
  for (int64_t i = 0; i < g.m; ++i) rows[i] = g.a + i * g.am;
  for (int64_t j = n0; j < std::min(g.n, n0 + width); ++j) {
    const float *b = g.b + j * g.bn;
    float *c = g.c + j;
    int64_t i = 0;
    for (; i + 4 <= g.m; i += 4) DotRows<W, 4>(rows + i, b, g.p, c + i * g.ldc, g.ldc);
    if (i + 2 <= g.m) DotRows<W, 2>(rows + i, b, g.p, c + i * g.ldc, g.ldc), i += 2;
    if (i < g.m) DotRows<W, 1>(rows + i, b, g.p, c + i * g.ldc, g.ldc);
  }
}

// A register tile of MR x NV vectors of W lanes, C[MR, NR = NV W]. The tiles of the instruction
// sets fill most of their vector registers with accumulators (24 of AVX-512's 32, 12 of AVX2's 16).
template <int W, int MR, int NV>
struct Tiling {
  static constexpr int kLanes = W, kRows = MR, kVectors = NV, kCols = NV * W;
};
using Avx512Tiling = Tiling<16, 12, 2>;
using Avx2Tiling = Tiling<8, 6, 2>;
using GenericTiling = Tiling<4, 6, 2>;

// One task, columns [n0, n0 + T::kCols) of g (inlined into each instruction set's entry below).
template <class T>
__attribute__((always_inline)) inline void Task(const Gemm &g, int64_t n0, float *panel) {
  if (ByDots(g)) {
    GemmDots<T::kLanes>(g, n0, T::kCols);
  } else {
    GemmPanel<T::kLanes, T::kRows, T::kVectors>(g, n0, panel);
  }
}

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
struct Kernel {
  int cols;  // per task
  void (*task)(const Gemm &, int64_t, float *);
};

void TaskGeneric(const Gemm &g, int64_t n0, float *panel) { Task<GenericTiling>(g, n0, panel); }
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void TaskAvx2(const Gemm &g, int64_t n0, float *panel) {
  Task<Avx2Tiling>(g, n0, panel);
}
__attribute__((target("avx512f"))) void TaskAvx512(const Gemm &g, int64_t n0, float *panel) {
  Task<Avx512Tiling>(g, n0, panel);
}
#endif

Isa BestIsa() {
#if defined(__x86_64__)
  static const Isa best = __builtin_cpu_supports("avx512f")                                  ? kAvx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? kAvx2
                                                                                              : kGeneric;
  return best;
#else
  return kGeneric;
#endif
}

std::atomic<int> forced_isa(-1);  // GroupedMatmulForceIsa

Kernel ChosenKernel() {
  const int forced = forced_isa.load();
  switch (forced < 0 ? BestIsa() : forced) {
#if defined(__x86_64__)
    case kAvx512:
      return {Avx512Tiling::kCols, TaskAvx512};
    case kAvx2:
      return {Avx2Tiling::kCols, TaskAvx2};
#endif
    default:
      return {GenericTiling::kCols, TaskGeneric};
  }
}

// Every GEMM of `gemms` (zero-filled where P == 0), split into (gemm, panel) tasks over threads.
void RunGemms(const std::vector<Gemm> &gemms) {
  const Kernel kernel = ChosenKernel();
  std::vector<std::pair<int, int64_t>> tasks;
  double flops = 0;
  for (int i = 0; i < (int)gemms.size(); ++i) {
    const Gemm &g = gemms[i];
    if (g.m == 0) continue;
    if (g.p == 0) {
      for (int64_t r = 0; r < g.m; ++r) std::memset(g.c + r * g.ldc, 0, g.n * sizeof(float));
      continue;
    }
    for (int64_t n0 = 0; n0 < g.n; n0 += kernel.cols) tasks.emplace_back(i, n0);
    flops += 2.0 * g.m * g.n * g.p;
  }
  int threads = mindport::ThreadsFor(flops, 4e6);
  mindport::ParallelFor((int64_t)tasks.size(), threads, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float panel[kPanelFloats];  // whole cache lines: a vector load never splits one
    for (int64_t t = begin; t < end; ++t) kernel.task(gemms[tasks[t].first], tasks[t].second, panel);
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

int GroupedMatmulForceIsa(int isa) {
  if (isa > (int)BestIsa()) return 1;
  forced_isa.store(isa);
  return 0;
}

MINDPORT_EXPORT(GroupedMatmul)
MINDPORT_EXPORT(GroupedMatmulBackward)

}  // extern "C"
