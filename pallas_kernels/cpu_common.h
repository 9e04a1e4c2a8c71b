// What the C++ CPU kernels (XLA FFI custom calls) share: 16-lane float vectors (GCC vector extensions, which
// compile to AVX-512, AVX2 or NEON), loads that convert int8 / int4 to float in registers, and a parallel loop
// on XLA's intra-op pool. In ParallelFor, item i of n runs on the calling thread or on a pool task, whichever
// claims it first from an atomic counter; the caller then waits only for items already claimed, so it never
// waits on a task the pool has not started (XLA allows a pool of one thread, or tasks that run after the call
// returns: those find no item left and touch only the shared counters).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace jaxllm {

constexpr int kLanes = 16;
typedef float f32v __attribute__((vector_size(64)));

inline f32v load_f32(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_f32(float* p, f32v v) { std::memcpy(p, &v, sizeof v); }

// 16 bytes (int8, or uint8 nibbles already masked) -> 16 floats. GCC scalarizes __builtin_convertvector from
// 8- to 32-bit lanes, so x86 gets the sign/zero extension and conversion instructions by hand.
template <bool SIGNED>
inline f32v to_f32(const void* bytes, int shift = 0) {
#if defined(__AVX512F__)
  __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(bytes));
  if (!SIGNED) b = _mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(15));
  const __m512i i = SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  f32v out;
  const __m512 f = _mm512_cvtepi32_ps(i);
  std::memcpy(&out, &f, sizeof out);
  return out;
#elif defined(__AVX2__)
  __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(bytes));
  if (!SIGNED) b = _mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(15));
  const __m256i lo = SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  const __m256i hi = SIGNED ? _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)) : _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
  const __m256 f[2] = {_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi)};
  f32v out;
  std::memcpy(&out, f, sizeof out);
  return out;
#else
  f32v out;
  for (int i = 0; i < kLanes; ++i) {
    const uint8_t b = static_cast<const uint8_t*>(bytes)[i];
    out[i] = SIGNED ? float(static_cast<int8_t>(b)) : float((b >> shift) & 15);
  }
  return out;
#endif
}

inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n;
    std::function<void(int64_t)> fn;
    void Run() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = std::move(fn);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Run(); });
  state->Run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace jaxllm
