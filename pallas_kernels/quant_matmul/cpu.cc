// Weight-only quantized matmul on CPU for decode-sized batches: y [M, N] = x [M, K] @ W [K, N], W read as
// stored (int8, or int4 packed two per byte; layouts in reference.py) and converted in registers, so a step
// reads one (half a) byte per weight. An XLA FFI custom call; cpu.py compiles it with the machine's C++
// compiler (-march=native) and registers it.
//
// Work splits into chunks of 16 * V output columns (64 at V = 4: one cache line of int8 per row of W), run on
// the caller and XLA's intra-op pool (cpu_common.h).
// Per chunk, rows of x go in blocks of up to 4: float32 accumulators [rows, V vectors of 16], one FMA per
// weight and row. Groups (G > 1, or a zero) accumulate each group apart, then scale it (and add zero times
// the group's sum of x).

#include <cstdint>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxllm::f32v, jaxllm::kLanes, jaxllm::load_f32, jaxllm::store_f32, jaxllm::to_f32;
constexpr int kPrefetch = 32;  // rows of W ahead: a chunk walks W's rows N bytes apart, too far for the prefetcher

struct Problem {
  const float* x;        // [m, k]
  const uint8_t* w;      // int8 [k, n] or int4 bytes [k, n / 2]
  const float* scale;    // [groups, n]
  const float* zero;     // [groups, n] or null
  float* y;              // [m, n]
  int64_t m, k, n, groups, half;  // half: int4's half-block width (0 for int8)
  std::vector<float> xsum;  // [m, groups]: each group's sum of x, when there is a zero
};

// One chunk's weights at row `kk` as V float vectors; col[v] is the first output column of vector v.
template <int V, bool INT4>
inline void load_weights(const Problem& p, int64_t kk, const int64_t* byte, f32v* out) {
  if constexpr (INT4) {
    const uint8_t* row = p.w + kk * (p.n / 2);
    for (int u = 0; u < V / 2; ++u) {
      out[2 * u] = to_f32<false>(row + byte[u], 0);
      out[2 * u + 1] = to_f32<false>(row + byte[u], 4);
    }
  } else {
    const int8_t* row = reinterpret_cast<const int8_t*>(p.w) + kk * p.n;
    for (int v = 0; v < V; ++v) out[v] = to_f32<true>(row + byte[v]);
  }
}

// Rows [r0, r0 + MB) of y over one chunk: byte[] the chunk's byte offsets in a row of W, col[] its columns.
template <int MB, int V, bool INT4, bool GROUPED>
void rows_block(const Problem& p, int64_t r0, const int64_t* byte, const int64_t* col) {
  f32v acc[MB][V] = {};
  const int64_t group = p.k / p.groups;
  const float* x = p.x + r0 * p.k;
  for (int64_t g = 0; g < p.groups; ++g) {
    f32v part[MB][V] = {};
    for (int64_t kk = g * group; kk < (g + 1) * group; ++kk) {
      f32v w[V];
      __builtin_prefetch(p.w + (kk + kPrefetch) * (INT4 ? p.n / 2 : p.n) + byte[0]);
      load_weights<V, INT4>(p, kk, byte, w);
#pragma GCC unroll 4
      for (int r = 0; r < MB; ++r) {
        const float xv = x[r * p.k + kk];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) part[r][v] += xv * w[v];
      }
    }
    if constexpr (GROUPED) {
      for (int v = 0; v < V; ++v) {
        const f32v s = load_f32(p.scale + g * p.n + col[v]);
        const f32v z = p.zero ? load_f32(p.zero + g * p.n + col[v]) : f32v{};
        for (int r = 0; r < MB; ++r) {
          acc[r][v] += part[r][v] * s;
          if (p.zero) acc[r][v] += p.xsum[(r0 + r) * p.groups + g] * z;
        }
      }
    } else {
      for (int r = 0; r < MB; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = part[r][v];
    }
  }
  for (int v = 0; v < V; ++v) {
    const f32v s = GROUPED ? f32v{} + 1.0f : load_f32(p.scale + col[v]);
    for (int r = 0; r < MB; ++r) store_f32(p.y + (r0 + r) * p.n + col[v], acc[r][v] * s);
  }
}

template <int V, bool INT4, bool GROUPED>
void chunk(const Problem& p, int64_t c) {
  int64_t byte[V], col[V];
  if constexpr (INT4) {  // byte j of a row lies in half-block b = j / H: low nibble column 2bH + j % H, high + H
    for (int u = 0; u < V / 2; ++u) {
      const int64_t j = c * (kLanes * V / 2) + kLanes * u, b = j / p.half;
      byte[u] = j;
      col[2 * u] = 2 * b * p.half + j % p.half;
      col[2 * u + 1] = col[2 * u] + p.half;
    }
  } else {
    for (int v = 0; v < V; ++v) byte[v] = col[v] = c * kLanes * V + kLanes * v;
  }
  int64_t r = 0;
  for (; r + 4 <= p.m; r += 4) rows_block<4, V, INT4, GROUPED>(p, r, byte, col);
  for (; r + 2 <= p.m; r += 2) rows_block<2, V, INT4, GROUPED>(p, r, byte, col);
  for (; r < p.m; ++r) rows_block<1, V, INT4, GROUPED>(p, r, byte, col);
}

// Any shape, one column at a time: the fallback where N (int8) or the half-block (int4) is not a multiple of 16.
void scalar_chunk(const Problem& p, int64_t c) {
  const int64_t group = p.k / p.groups;
  for (int64_t n = c * kLanes; n < (c + 1) * kLanes && n < p.n; ++n) {
    int64_t byte = n, shift = 0;
    if (p.half) {
      const int64_t b = n / (2 * p.half), j = n % (2 * p.half);
      byte = b * p.half + j % p.half;
      shift = j < p.half ? 0 : 4;
    }
    for (int64_t r = 0; r < p.m; ++r) {
      float acc = 0;
      for (int64_t g = 0; g < p.groups; ++g) {
        float part = 0;
        for (int64_t kk = g * group; kk < (g + 1) * group; ++kk) {
          const float q = p.half ? float((p.w[kk * (p.n / 2) + byte] >> shift) & 15)
                                 : float(reinterpret_cast<const int8_t*>(p.w)[kk * p.n + byte]);
          part += p.x[r * p.k + kk] * q;
        }
        acc += part * p.scale[g * p.n + n];
        if (p.zero) acc += p.xsum[r * p.groups + g] * p.zero[g * p.n + n];
      }
      p.y[r * p.n + n] = acc;
    }
  }
}

using ChunkFn = void (*)(const Problem&, int64_t);

// The chunk function for this problem and the number of chunks it splits N into.
std::pair<ChunkFn, int64_t> plan(const Problem& p) {
  const bool grouped = p.groups > 1 || p.zero;
  if (p.half) {
    if (p.half % kLanes) return {scalar_chunk, (p.n + kLanes - 1) / kLanes};
    const int v = p.half % (2 * kLanes) == 0 ? 4 : 2;  // a chunk stays inside one half-block
    if (v == 4) return {grouped ? chunk<4, true, true> : chunk<4, true, false>, p.n / (kLanes * 4)};
    return {grouped ? chunk<2, true, true> : chunk<2, true, false>, p.n / (kLanes * 2)};
  }
  if (p.n % kLanes) return {scalar_chunk, (p.n + kLanes - 1) / kLanes};
  const int64_t vecs = p.n / kLanes;
  if (vecs % 4 == 0) return {grouped ? chunk<4, false, true> : chunk<4, false, false>, vecs / 4};
  if (vecs % 2 == 0) return {grouped ? chunk<2, false, true> : chunk<2, false, false>, vecs / 2};
  return {grouped ? chunk<1, false, true> : chunk<1, false, false>, vecs};
}

// `out` is never read: a caller may alias it to the result (tests pass a NaN-filled one to catch unwritten outputs).
ffi::Error QuantMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> zero, ffi::Buffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> y,
                       int64_t half, int64_t has_zero) {
  const auto xd = x.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || sd.size() != 2) return ffi::Error::InvalidArgument("x and scale must be 2-D");
  Problem p;
  p.m = xd[0], p.k = xd[1], p.groups = sd[0], p.n = sd[1], p.half = half;
  const int64_t w_cols = half ? p.n / 2 : p.n;
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[0] != p.k || wd[1] != w_cols || p.k % p.groups)
    return ffi::Error::InvalidArgument("w must be [K, N] (int8) or [K, N / 2] (int4) with G | K");
  if (w.element_type() != (half ? ffi::DataType::U8 : ffi::DataType::S8))
    return ffi::Error::InvalidArgument("w must be int8, or uint8 with half > 0");
  if (half && (p.n % (2 * half))) return ffi::Error::InvalidArgument("half must tile N in pairs");
  p.x = x.typed_data();
  p.w = static_cast<const uint8_t*>(w.untyped_data());
  p.scale = scale.typed_data();
  p.zero = has_zero ? zero.typed_data() : nullptr;
  p.y = y->typed_data();
  if (p.zero) {
    const int64_t group = p.k / p.groups;
    p.xsum.assign(p.m * p.groups, 0.0f);
    for (int64_t r = 0; r < p.m; ++r)
      for (int64_t kk = 0; kk < p.k; ++kk) p.xsum[r * p.groups + kk / group] += p.x[r * p.k + kk];
  }
  const auto [fn, num_chunks] = plan(p);
  jaxllm::ParallelFor(pool, num_chunks, [&p, fn = fn](int64_t c) { fn(p, c); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQuantMatmul, QuantMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("half")
                                  .Attr<int64_t>("has_zero"));
