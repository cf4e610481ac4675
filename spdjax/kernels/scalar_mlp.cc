// The backward of spdjax.ci.scalar_mlp, one hidden layer per subcomponent on a scalar,
//   z[n,c] = sum_k w2[c,k] GELU(w1[c,k] h[n,c] + b1[c,k]) + b2[c]   (exact GELU: x Phi(x)),
// as one CPU kernel: (dw1, db1, dw2, dh) from (w1, b1, w2, h, dz). XLA:CPU runs the pure-JAX form as
// several memory-bound passes over the (N, C, H) hidden layer; here each hidden unit lives in
// registers only, recomputed from h. Rows are split over XLA's intra-op
// thread pool; the weight gradients are summed per task, then across tasks.
//
// Phi(x) = 0.5 (1 + erf(x / sqrt 2)) uses Abramowitz & Stegun 7.1.26 (|error in erf| <= 1.5e-7),
// whose exp(-x^2 / 2) is also the normal density's, so the backward needs one exp per hidden unit.

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "kernels_common.h"

namespace {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

using kernels::kLanes;
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));

inline vf splat(float x) { return vf{} + x; }

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline vf as_float(vi v) { return reinterpret_cast<vf&>(v); }
inline vi as_int(vf v) { return reinterpret_cast<vi&>(v); }

inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_max_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b)));
#elif defined(__AVX__)
  return reinterpret_cast<vf>(_mm256_max_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b)));
#else
  return a > b ? a : b;
#endif
}

// exp(x) for x <= 0 (relative error < 3e-7): x = n ln2 + r, |r| <= ln2 / 2, and
// exp(r) ~ 1 + r + r^2 P(r) with P's coefficients fitted for the least maximum relative error.
inline vf exp_nonpositive(vf x) {
  x = vmax(x, splat(-87.0f));
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf k = x * 1.44269504088896341f + shifter;
  const vf n = k - shifter;
  vf r = x - n * 0.693145751953125f;  // ln 2 split in two, so that n * hi is exact
  r = r - n * 1.428606765330187045e-06f;
  vf p = splat(0.00831348f);
  p = p * r + 0.04189105f;
  p = p * r + 0.16667111f;
  p = p * r + 0.49999229f;
  p = p * (r * r) + r + 1.0f;
  // k's low mantissa bits hold n: 2^n is (n + 127) << 23
  return p * as_float((as_int(k) + (127 - 0x4B400000)) << 23);
}

// Phi(x) and exp(-x^2 / 2) of the hidden pre-activations x, by A&S 7.1.26 with t = |x| / sqrt 2:
// 0.5 erfc(t) = 0.5 s (a1 + s (a2 + ...)) exp(-t^2), s = 1 / (1 + p t).
inline void phi_parts(vf x, vf& cdf, vf& gauss) {
  const vf ax = as_float(as_int(x) & 0x7fffffff);
  gauss = exp_nonpositive(x * x * -0.5f);
  const vf s = 1.0f / (ax * (0.3275911f * kInvSqrt2) + 1.0f);
  const vf half_q =
      s * (0.127414796f + s * (-0.142248368f + s * (0.7107068705f + s * (-0.7265760135f + s * 0.5307027145f))));
  const vf half_tail = half_q * gauss;  // 0.5 erfc(|x| / sqrt 2)
  cdf = x >= 0.0f ? 1.0f - half_tail : half_tail;
}

int64_t padded(int64_t C) { return (C + kLanes - 1) / kLanes * kLanes; }

// (C, H) weights as (H, Cp), Cp = C rounded up to whole vectors, zero-padded.
std::vector<float> transposed(const float* w, int64_t C, int64_t H) {
  const int64_t Cp = padded(C);
  std::vector<float> t(H * Cp, 0.0f);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < H; ++k) t[k * Cp + c] = w[c * H + k];
  return t;
}

// Lanes [c, c + kLanes) of a row of C values; lanes past C read as 0.
inline vf load_row(const float* row, int64_t c, int64_t C) {
  if (c + kLanes <= C) return load(row + c);
  float tmp[kLanes] = {};
  std::memcpy(tmp, row + c, (C - c) * sizeof(float));
  return load(tmp);
}

inline void store_row(float* row, int64_t c, int64_t C, vf v) {
  if (c + kLanes <= C) return store(row + c, v);
  float tmp[kLanes];
  store(tmp, v);
  std::memcpy(row + c, tmp, (C - c) * sizeof(float));
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> b1,
                    ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> dz,
                    ffi::ResultBuffer<ffi::F32> dw1, ffi::ResultBuffer<ffi::F32> db1,
                    ffi::ResultBuffer<ffi::F32> dw2, ffi::ResultBuffer<ffi::F32> dh) {
  const int64_t C = w1.dimensions()[0], H = w1.dimensions()[1], Cp = padded(C);
  const int64_t N = h.element_count() / C;
  const std::vector<float> w1t = transposed(w1.typed_data(), C, H);
  const std::vector<float> b1t = transposed(b1.typed_data(), C, H);
  const std::vector<float> w2t = transposed(w2.typed_data(), C, H);
  const float* hp = h.typed_data();
  const float* dzp = dz.typed_data();
  float* dhp = dh->typed_data();
  const kernels::Split sp = kernels::split(pool, N, C * H, 32768);
  const int64_t tasks = sp.pieces;
  const int64_t block = H * Cp;
  // per piece, (3, H, Cp): the sums of dw1, db1, dw2 over its rows
  std::vector<float> sums(tasks * 3 * block, 0.0f);
  const float* __restrict W1 = w1t.data();
  const float* __restrict B1 = b1t.data();
  const float* __restrict W2 = w2t.data();
  float* const sums0 = sums.data();
  kernels::parallel_rows(pool, N, tasks, sp.helpers, [=](int64_t r0, int64_t r1, int64_t task) {
    float* __restrict s1 = sums0 + task * 3 * block;  // dw1
    float* __restrict s0 = s1 + block;                // db1
    float* __restrict s2 = s0 + block;                // dw2
    for (int64_t c = 0; c < C; c += kLanes) {
      for (int64_t n = r0; n < r1; ++n) {
        const vf x = load_row(hp + n * C, c, C);
        const vf g_out = load_row(dzp + n * C, c, C);  // 0 in padded lanes: they add nothing
        vf acc = {};
        for (int64_t k = 0; k < H; ++k) {
          const int64_t o = k * Cp + c;
          const vf a = load(W1 + o);
          const vf pre = x * a + load(B1 + o);
          vf cdf, gauss;
          phi_parts(pre, cdf, gauss);
          const vf g = g_out * load(W2 + o) * (cdf + pre * gauss * kInvSqrt2Pi);
          store(s1 + o, load(s1 + o) + g * x);
          store(s0 + o, load(s0 + o) + g);
          store(s2 + o, load(s2 + o) + pre * cdf * g_out);
          acc += g * a;
        }
        store_row(dhp + n * C, c, C, acc);
      }
    }
  });
  float* outs[3] = {dw1->typed_data(), db1->typed_data(), dw2->typed_data()};
  for (int64_t j = 0; j < 3; ++j)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < H; ++k) {
        float s = 0.0f;
        for (int64_t t = 0; t < tasks; ++t) s += sums[(t * 3 + j) * block + k * Cp + c];
        outs[j][c * H + k] = s;
      }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdjaxScalarMlpBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
