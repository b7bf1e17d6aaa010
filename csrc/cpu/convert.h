// How the CPU kernels read their inputs: scalar conversions between tokcomp's storage dtypes and
// float32, written so that loops over them vectorise (bfloat16 is plain bit manipulation; float16
// uses c10's conversion), and rows with contiguous channels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace tokcomp::cpu {

inline float to_float(float v) {
  return v;
}

inline float to_float(c10::BFloat16 v) {
  // bfloat16 is the top half of a float32.
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float to_float(c10::Half v) {
  return static_cast<float>(v);
}

template <typename scalar_t>
inline scalar_t from_float(float v);

template <>
inline float from_float<float>(float v) {
  return v;
}

template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  // Round to nearest even, like c10::BFloat16(float), NaN kept a (quiet) NaN.
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint16_t out = v != v ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(out, c10::BFloat16::from_bits());
}

template <>
inline c10::Half from_float<c10::Half>(float v) {
  return c10::Half(v);
}

// t itself when its last dimension is contiguous (rows may be strided, e.g. x[:, ::2]), else a
// contiguous copy.
inline at::Tensor rows_with_unit_channel_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

}  // namespace tokcomp::cpu
