#pragma once
// Element types as safetensors names them, and exact conversions between bf16/fp16 and fp32.
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace fpf {

enum class DType : std::uint8_t { BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64 };

constexpr std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::BOOL:
    case DType::U8:
    case DType::I8: return 1;
    case DType::I16:
    case DType::F16:
    case DType::BF16: return 2;
    case DType::I32:
    case DType::F32: return 4;
    case DType::I64:
    case DType::F64: return 8;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) noexcept {
  switch (t) {
    case DType::BOOL: return "BOOL";
    case DType::U8: return "U8";
    case DType::I8: return "I8";
    case DType::I16: return "I16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F32: return "F32";
    case DType::F64: return "F64";
  }
  return "?";
}

constexpr std::optional<DType> parse_dtype(std::string_view s) noexcept {
  for (DType t : {DType::BOOL, DType::U8, DType::I8, DType::I16, DType::I32, DType::I64, DType::F16, DType::BF16,
                  DType::F32, DType::F64})
    if (dtype_name(t) == s) return t;
  return std::nullopt;
}

constexpr bool is_float(DType t) noexcept {
  return t == DType::F16 || t == DType::BF16 || t == DType::F32 || t == DType::F64;
}

// ---- bf16 / fp16 <-> fp32 (exact widening; round-to-nearest-even narrowing, NaN kept quiet) -----------------
inline float bf16_to_f32(std::uint16_t h) noexcept { return std::bit_cast<float>(std::uint32_t{h} << 16); }

inline std::uint16_t f32_to_bf16(float f) noexcept {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

inline float f16_to_f32(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (man << 13));
}

inline std::uint16_t f32_to_f16(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;            // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;           // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                 // below the smallest normal half: subnormal or zero
    const float v = std::bit_cast<float>(a);
    const float scaled = v * 16777216.0f;                // exact: v * 2^24
    return sign | static_cast<std::uint16_t>(std::nearbyint(scaled));  // default rounding mode: nearest-even
  }
  std::uint32_t r = a - 0x38000000u;                     // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);                        // round to nearest even at bit 13
  return sign | static_cast<std::uint16_t>(r >> 13);
}

// Reads element i of a little-endian buffer of type t as fp32 (integers converted by value).
inline float load_as_f32(const std::byte* p, DType t, std::size_t i) noexcept {
  auto rd = [&](auto tag) {
    decltype(tag) v;
    std::memcpy(&v, p + i * sizeof(v), sizeof(v));
    return v;
  };
  switch (t) {
    case DType::F32: return rd(float{});
    case DType::BF16: return bf16_to_f32(rd(std::uint16_t{}));
    case DType::F16: return f16_to_f32(rd(std::uint16_t{}));
    case DType::F64: return static_cast<float>(rd(double{}));
    case DType::BOOL:
    case DType::U8: return static_cast<float>(rd(std::uint8_t{}));
    case DType::I8: return static_cast<float>(rd(std::int8_t{}));
    case DType::I16: return static_cast<float>(rd(std::int16_t{}));
    case DType::I32: return static_cast<float>(rd(std::int32_t{}));
    case DType::I64: return static_cast<float>(rd(std::int64_t{}));
  }
  return 0.0f;
}

}  // namespace fpf
