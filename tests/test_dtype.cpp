#include <doctest/doctest.h>

#include <bit>
#include <cstdint>
#include <limits>
#include <random>

#include <fpf/core/dtype.hpp>

using namespace fpf;

TEST_CASE("dtype: bf16 round trip and round-to-nearest-even") {
  CHECK(bf16_to_f32(0x3f80) == 1.0f);
  CHECK(f32_to_bf16(1.0f) == 0x3f80);
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties to even (1.0)
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3f808000u)) == 0x3f80);
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3f818000u)) == 0x3f82);
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3f808001u)) == 0x3f81);
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = bf16_to_f32(static_cast<std::uint16_t>(h));
    if (f != f) continue;
    REQUIRE(f32_to_bf16(f) == h);
  }
}

TEST_CASE("dtype: fp16 widening is exact and narrowing inverts it") {
  CHECK(f16_to_f32(0x3c00) == 1.0f);
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
  CHECK(f16_to_f32(0x7bff) == 65504.0f);
  CHECK(std::isinf(f16_to_f32(0x7c00)));
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_to_f32(static_cast<std::uint16_t>(h));
    if (f != f) continue;
    REQUIRE(f32_to_f16(f) == h);
  }
  CHECK(f32_to_f16(65520.0f) == 0x7c00);           // rounds up to inf
  CHECK(f32_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);  // halfway: ties to even
}

TEST_CASE("dtype: names parse back") {
  for (DType t : {DType::BOOL, DType::U8, DType::I8, DType::I16, DType::I32, DType::I64, DType::F16, DType::BF16,
                  DType::F32, DType::F64})
    CHECK(parse_dtype(dtype_name(t)) == t);
  CHECK_FALSE(parse_dtype("F8_E4M3").has_value());
}
