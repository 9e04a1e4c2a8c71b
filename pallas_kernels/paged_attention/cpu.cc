// Paged attention for decode steps on CPU (each sequence has at most one query token, its last position): reads
// every visible key and value once, straight from the pages (float32, or int8 with a scale per token and KV
// head), with an online softmax. An XLA FFI custom call; cpu.py compiles it (pallas_kernels/cpu_ffi.py) and
// falls back to xla.py for other steps, dtypes and head sizes.
//
// Work items are (sequence, KV head, split of its keys), run on the caller and XLA's intra-op pool
// (cpu_common.h); each keeps, per query head of its group, a running max m, sum l and weighted sum of values
// acc [head_dim], walking its keys 16 at a time. The caller then merges the splits:
// out = sum_i acc_i e^(m_i - M) / sum_i l_i e^(m_i - M), M = max_i m_i.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxllm::f32v, jaxllm::kLanes;  // kLanes: floats per vector, and keys per block
typedef int32_t i32v __attribute__((vector_size(64)));

inline f32v load(const float* p) { return jaxllm::load_f32(p); }
inline f32v load(const int8_t* p) { return jaxllm::to_f32<true>(p); }
inline void store(float* p, f32v v) { jaxllm::store_f32(p, v); }

inline float hsum(f32v v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// e^x for x <= 0 (scores less their max), to ~2 ulp: 2^n e^r with |r| <= ln2 / 2, degree-6 polynomial.
inline f32v vexp(f32v x) {
  x = x < -87.0f ? f32v{} - 87.0f : x;  // lanes: e^-87 ~ 1.6e-38, still a normal float
  const f32v n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, i32v), f32v);
  const f32v r = x - n * 0.693359375f + n * 2.12194440e-4f;
  f32v p = 1.0f / 720 + r * 0.0f;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i32v bits = (__builtin_convertvector(n, i32v) + 127) << 23;
  f32v scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Problem {
  const float* q;  // [tokens, heads, dim]
  const void *k, *v;  // [pages, page_size, kv_heads, dim], float32 or int8
  const float *k_scale, *v_scale;  // int8 pages: [pages, page_size, kv_heads]; float32 pages: null
  const int32_t *tables, *seq_lens, *starts;  // [seqs, pages_per_seq], [seqs], [seqs + 1]
  float* out;  // [tokens, heads, dim]
  int64_t tokens, heads, dim, page_size, kv_heads, seqs, pages_per_seq, group, splits;
  float scale, soft_cap;  // soft_cap 0: none
  int64_t window;          // 0: none
  std::vector<float> m, l, acc;  // per (seq, kv head, split, query head of the group): [.., dim] for acc

  // Keys [lo, hi) that sequence s's query sees (empty if it has none this step).
  std::pair<int64_t, int64_t> visible(int64_t s) const {
    if (starts[s + 1] - starts[s] != 1) return {0, 0};
    const int64_t hi = seq_lens[s], lo = window ? std::max<int64_t>(0, hi - window) : 0;
    return {lo, hi};
  }
};

template <typename T>
void item(Problem& p, int64_t index) {
  const int64_t split = index % p.splits, h = index / p.splits % p.kv_heads, s = index / p.splits / p.kv_heads;
  const int64_t G = p.group, D = p.dim, base = index * G;
  float* m = &p.m[base];
  float* l = &p.l[base];
  float* acc = &p.acc[base * D];
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.0f);
  std::fill(acc, acc + G * D, 0.0f);
  const auto [lo, hi] = p.visible(s);
  const int64_t per = (hi - lo + p.splits - 1) / p.splits;
  const int64_t begin = lo + split * per, end = std::min(hi, begin + per);
  if (begin >= end) return;
  const float* q = p.q + (p.starts[s] * p.heads + h * G) * D;
  const int32_t* table = p.tables + s * p.pages_per_seq;
  float sc[64][kLanes];  // scores of this block, per query head (group <= 64, checked by the caller)
  const T* keys[kLanes];
  const T* values[kLanes];
  float k_scale[kLanes], v_scale[kLanes];
  for (int64_t j0 = begin; j0 < end; j0 += kLanes) {
    const int nk = static_cast<int>(std::min<int64_t>(kLanes, end - j0));
    for (int j = 0; j < nk; ++j) {
      const int64_t pos = j0 + j, slot = int64_t(table[pos / p.page_size]) * p.page_size + pos % p.page_size;
      keys[j] = static_cast<const T*>(p.k) + (slot * p.kv_heads + h) * D;
      values[j] = static_cast<const T*>(p.v) + (slot * p.kv_heads + h) * D;
      k_scale[j] = p.k_scale ? p.k_scale[slot * p.kv_heads + h] : 1.0f;
      v_scale[j] = p.v_scale ? p.v_scale[slot * p.kv_heads + h] : 1.0f;
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int j = 0; j < kLanes; ++j) sc[g][j] = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < nk; ++j) {
        f32v dot = {};
        for (int64_t d = 0; d < D; d += kLanes) dot += load(q + g * D + d) * load(keys[j] + d);
        float x = hsum(dot) * k_scale[j] * p.scale;
        if (p.soft_cap) x = p.soft_cap * std::tanh(x / p.soft_cap);
        sc[g][j] = x;
      }
      float block_max = sc[g][0];
      for (int j = 1; j < nk; ++j) block_max = std::max(block_max, sc[g][j]);
      const float m_new = std::max(m[g], block_max), alpha = std::exp(m[g] - m_new);
      const f32v probs = vexp(load(sc[g]) - m_new);
      float* a = acc + g * D;
      float sum = 0;
      for (int j = 0; j < nk; ++j) sum += probs[j];
      l[g] = l[g] * alpha + sum;
      m[g] = m_new;
      for (int64_t d = 0; d < D; d += kLanes) {
        f32v o = load(a + d) * alpha;
        for (int j = 0; j < nk; ++j) o += probs[j] * v_scale[j] * load(values[j] + d);
        store(a + d, o);
      }
    }
  }
}

// `out` is never read: a caller may alias it to the result (tests pass a NaN-filled one).
// k_scale, v_scale: read only with int8 pages (`quantized`).
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> starts,
                           ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> y, float scale, float soft_cap, int64_t window,
                           int64_t quantized) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("q [T, H, D], k and v [P, page, KVH, D], tables [S, pages] expected");
  Problem p;
  p.tokens = qd[0], p.heads = qd[1], p.dim = qd[2], p.page_size = kd[1], p.kv_heads = kd[2];
  p.seqs = td[0], p.pages_per_seq = td[1];
  if (kd[3] != p.dim || p.dim % kLanes || p.heads % p.kv_heads || p.heads / p.kv_heads > 64)
    return ffi::Error::InvalidArgument("head_dim must match and be a multiple of 16; group <= 64");
  p.group = p.heads / p.kv_heads;
  const auto page_type = quantized ? ffi::DataType::S8 : ffi::DataType::F32;
  if (k.element_type() != page_type || v.element_type() != page_type)
    return ffi::Error::InvalidArgument("pages must be float32, or int8 with quantized = 1");
  p.q = q.typed_data(), p.k = k.untyped_data(), p.v = v.untyped_data();
  p.k_scale = quantized ? k_scale.typed_data() : nullptr, p.v_scale = quantized ? v_scale.typed_data() : nullptr;
  p.tables = tables.typed_data(), p.seq_lens = seq_lens.typed_data(), p.starts = starts.typed_data();
  p.out = y->typed_data();
  p.scale = scale, p.soft_cap = soft_cap, p.window = window;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t longest = 0;
  for (int64_t s = 0; s < p.seqs; ++s) {
    const auto [lo, hi] = p.visible(s);
    longest = std::max(longest, hi - lo);
  }
  // Enough items for every thread twice over, but splits of at least 64 keys.
  const int64_t want = (2 * threads + p.seqs * p.kv_heads - 1) / (p.seqs * p.kv_heads);
  p.splits = std::max<int64_t>(1, std::min(want, longest / 64));
  const int64_t num_items = p.seqs * p.kv_heads * p.splits;
  p.m.resize(num_items * p.group);
  p.l.resize(num_items * p.group);
  p.acc.resize(num_items * p.group * p.dim);
  const auto run = quantized ? item<int8_t> : item<float>;
  jaxllm::ParallelFor(pool, num_items, [&p, run](int64_t i) { run(p, i); });

  std::fill(p.out, p.out + p.tokens * p.heads * p.dim, 0.0f);  // tokens without a query (padding) stay zero
  const int64_t D = p.dim;
  for (int64_t s = 0; s < p.seqs; ++s) {
    const auto [lo, hi] = p.visible(s);
    if (lo >= hi) continue;
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      const int64_t first = (s * p.kv_heads + h) * p.splits;
      for (int64_t g = 0; g < p.group; ++g) {
        float big = -std::numeric_limits<float>::infinity(), total = 0;
        for (int64_t i = 0; i < p.splits; ++i) big = std::max(big, p.m[(first + i) * p.group + g]);
        float* o = p.out + (p.starts[s] * p.heads + h * p.group + g) * D;
        for (int64_t i = 0; i < p.splits; ++i) {
          const int64_t at = (first + i) * p.group + g;
          if (p.l[at] == 0) continue;  // an empty split
          const float w = std::exp(p.m[at] - big);
          total += p.l[at] * w;
          for (int64_t d = 0; d < D; ++d) o[d] += p.acc[at * D + d] * w;
        }
        for (int64_t d = 0; d < D; ++d) o[d] /= total;
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("quantized"));
