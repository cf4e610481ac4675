// Threefry-2x32 with 20 rounds (Salmon et al. 2011), the hash behind jax.random, as one CPU kernel:
// (y1, y2) = threefry2x32((k1, k2), (x1, x2)) elementwise, bit for bit JAX's threefry2x32_p.
// Each input holds either one element (broadcast) or as many as the outputs. XLA:CPU runs the
// pure-JAX form as a loop of fused kernels over 64-bit lanes; here the 20 rounds of a vector of
// counters stay in registers (a rotate is one instruction with AVX-512).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels_common.h"

namespace {

using kernels::kLanes;
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));

template <int D>
inline vu rotl(vu x) {
  return (x << D) | (x >> (32 - D));
}

template <int R0, int R1, int R2, int R3>
inline void rounds(vu& a, vu& b) {
  a += b; b = rotl<R0>(b) ^ a;
  a += b; b = rotl<R1>(b) ^ a;
  a += b; b = rotl<R2>(b) ^ a;
  a += b; b = rotl<R3>(b) ^ a;
}

inline void hash(vu k0, vu k1, vu& a, vu& b) {
  const vu k2 = k0 ^ k1 ^ 0x1BD11BDA;
  a += k0; b += k1;
  rounds<13, 15, 26, 6>(a, b);  a += k1; b += k2 + 1;
  rounds<17, 29, 16, 24>(a, b); a += k2; b += k0 + 2;
  rounds<13, 15, 26, 6>(a, b);  a += k0; b += k1 + 3;
  rounds<17, 29, 16, 24>(a, b); a += k1; b += k2 + 4;
  rounds<13, 15, 26, 6>(a, b);  a += k2; b += k0 + 5;
}

// Lanes [i, i + kLanes) of an input of `count` elements: one element broadcasts; a short tail reads 0.
inline vu load(const uint32_t* p, int64_t count, int64_t i, int64_t n) {
  vu v;
  if (count == 1) return vu{} + p[0];
  if (i + kLanes <= n) {
    std::memcpy(&v, p + i, sizeof v);
    return v;
  }
  uint32_t tmp[kLanes] = {};
  std::memcpy(tmp, p + i, (n - i) * sizeof(uint32_t));
  std::memcpy(&v, tmp, sizeof v);
  return v;
}

inline void store(uint32_t* p, int64_t i, int64_t n, vu v) {
  if (i + kLanes <= n) return std::memcpy(p + i, &v, sizeof v), void();
  uint32_t tmp[kLanes];
  std::memcpy(tmp, &v, sizeof v);
  std::memcpy(p + i, tmp, (n - i) * sizeof(uint32_t));
}

ffi::Error Threefry(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> k1, ffi::Buffer<ffi::U32> k2,
                    ffi::Buffer<ffi::U32> x1, ffi::Buffer<ffi::U32> x2, ffi::ResultBuffer<ffi::U32> y1,
                    ffi::ResultBuffer<ffi::U32> y2) {
  const int64_t n = y1->element_count();
  const int64_t counts[4] = {static_cast<int64_t>(k1.element_count()), static_cast<int64_t>(k2.element_count()),
                             static_cast<int64_t>(x1.element_count()), static_cast<int64_t>(x2.element_count())};
  for (int64_t c : counts)
    if (c != 1 && c != n)
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "spdjax_threefry2x32: inputs must hold 1 or n elements");
  if (n == 0) return ffi::Error::Success();
  const uint32_t *pk1 = k1.typed_data(), *pk2 = k2.typed_data(), *px1 = x1.typed_data(), *px2 = x2.typed_data();
  uint32_t *py1 = y1->typed_data(), *py2 = y2->typed_data();
  // pieces of whole vectors; ~16k pairs each (a few microseconds)
  const int64_t vectors = (n + kLanes - 1) / kLanes;
  const kernels::Split sp = kernels::split(pool, vectors, kLanes, 16384);
  kernels::parallel_rows(pool, vectors, sp.pieces, sp.helpers, [=](int64_t v0, int64_t v1, int64_t) {
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t i = v * kLanes;
      vu a = load(px1, counts[2], i, n), b = load(px2, counts[3], i, n);
      hash(load(pk1, counts[0], i, n), load(pk2, counts[1], i, n), a, b);
      store(py1, i, n, a);
      store(py2, i, n, b);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdjaxThreefry2x32, Threefry,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>());
