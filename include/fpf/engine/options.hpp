#pragma once
// Runtime knobs that are not compile-time policies (DESIGN.md "runtime knobs").
#include <string>
#include <string_view>

#include <fpf/core/error.hpp>

namespace fpf {

// Activation precision. fp32 is the reference; bf16/fp16 are the GPU's working precisions (fp32 accumulation).
enum class Precision { fp32, bf16, fp16 };

inline std::string_view precision_name(Precision p) {
  switch (p) {
    case Precision::fp32: return "fp32";
    case Precision::bf16: return "bf16";
    case Precision::fp16: return "fp16";
  }
  return "?";
}

inline Precision parse_precision(std::string_view s) {
  if (s == "fp32") return Precision::fp32;
  if (s == "bf16") return Precision::bf16;
  if (s == "fp16") return Precision::fp16;
  throw Error("--precision", "unknown precision '" + std::string(s) + "' (fp32, bf16 or fp16)");
}

struct EngineOptions {
  Precision precision = Precision::fp32;
};

}  // namespace fpf
