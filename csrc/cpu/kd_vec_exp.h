// kd_vec_exp.h — the CPU kernel's vector exponential, 2^y, written once with
// at::vec (so the same source is AVX-512, AVX2, NEON or scalar code, whatever
// CPU_CAPABILITY the including object is compiled for).
//
// Exps are base 2 with log2(e) / tau folded into the per-head scale, so the
// argument is one multiply and the exp itself only "round, polynomial, scale":
//   n = round(clamp(y, -125, 127)), f = y - n in [-1/2, 1/2]
//   2^f = 1 + f (c1 + f (c2 + f (c3 + f (c4 + f c5)))), a relative-error
//         near-minimax fit (max 1.1e-7 = 0.9 ulp before rounding)
//   2^y = 2^f * 2^n, 2^n built from exponent bits; 0 where y < -125 (-inf
//         included: a masked class gets exactly p = 0), +inf where y >= 128,
//         NaN for NaN.
// 2^0 is exactly 1 (f = 0, n = 0), which makes 1-class heads exact.
// No result is ever denormal: producing one costs a ~150-cycle microcode
// assist, and values below 2^-125 = 2.4e-38 are irrelevant to every sum here
// (the kernel also flushes denormals, see FlushDenormalsGuard).
// Measured against double exp2 over [-125, 0]: max relative error 1.7e-7
// (1.4 ulp), the same values as the former per-instruction-set copies (same
// rounding, polynomial and exponent-bit scaling); being inline, it is cheaper
// than at::vec's exp_u20 or a call into Sleef per vector, and the exp
// throughput is what bounds this kernel once the logits stream from memory.
// float64 uses at::vec's exp2 (Sleef).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace rcfast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr float kExp2C1 = 0.6931470036506653f;
constexpr float kExp2C2 = 0.24022242426872253f;
constexpr float kExp2C3 = 0.05550733581185341f;
constexpr float kExp2C4 = 0.009671512991189957f;
constexpr float kExp2C5 = 0.0013264722656458616f;

// 2^y from y and f = y - n, n the rounded, clamped y (see above). `fraction`
// computes f from n; kd_vexp2_product gets it from an exact product.
template <typename Fraction>
inline Vectorized<float> exp2_from_parts(const Vectorized<float>& y, Fraction&& fraction) {
  using Vec = Vectorized<float>;
  const Vec lowest(-125.0f);
  const Vec n = at::vec::clamp(y, lowest, Vec(127.0f)).round();
  const Vec f = fraction(n);
  Vec p = at::vec::fmadd(Vec(kExp2C5), f, Vec(kExp2C4));
  p = at::vec::fmadd(p, f, Vec(kExp2C3));
  p = at::vec::fmadd(p, f, Vec(kExp2C2));
  p = at::vec::fmadd(p, f, Vec(kExp2C1));
  p = at::vec::fmadd(p, f, Vec(1.0f));
  // 2^n for integral n in [-125, 127]: the biased exponent in the float's bits.
  const auto exponent = (at::vec::convert_to_int_of_same_size(n) + Vectorized<int32_t>(127)) << Vectorized<int32_t>(23);
  const Vec value = p * at::vec::cast<float>(exponent);
  const Vec zeroed = Vec::blendv(value, Vec(0.0f), y < lowest);
  return Vec::blendv(zeroed, Vec(std::numeric_limits<float>::infinity()), y >= Vec(128.0f));
}

// 2^y.
template <typename acc_t>
inline Vectorized<acc_t> kd_vexp2(const Vectorized<acc_t>& y) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp2_from_parts(y, [&](const Vectorized<float>& n) { return y - n; });
  } else {
    return y.exp2();
  }
}

// 2^(x * c), with the fraction f = x c - n taken by an FMA from the exact
// product: as accurate for |x c| ~ 60 as for small arguments (a rounded
// product would lose |x c| 2^-24 in the exponent). Same cost as kd_vexp2.
template <typename acc_t>
inline Vectorized<acc_t> kd_vexp2_product(const Vectorized<acc_t>& x, const Vectorized<acc_t>& c) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp2_from_parts(x * c, [&](const Vectorized<float>& n) { return at::vec::fmsub(x, c, n); });
  } else {
    return (x * c).exp2();
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rcfast
