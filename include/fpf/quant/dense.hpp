#pragma once
// quant::Dense: unquantized Linear weights stored as `<module>.weight` [out, in] in F32, BF16 or F16 (the dtype
// config.json names). On the CPU they are widened to fp32 exactly.
#include <string>
#include <string_view>
#include <vector>

#include <fpf/core/error.hpp>
#include <fpf/model/weights.hpp>
#include <fpf/quant/packed.hpp>

namespace fpf::quant {

struct Dense {
  static constexpr std::string_view name = "dense";

  static bool stores(const model::WeightReader& r, const std::string& module) { return r.has(module + ".weight"); }

  // Never a 4-bit module (the backends then read `<m>.weight` as it is stored); packer exists for the interface.
  static bool quantized(const model::WeightReader&, const std::string&) { return false; }
  static Packer packer(model::WeightReader&, const std::string& module, std::int64_t, std::int64_t) {
    throw Error(module, "quant::Dense stores no packed modules");
  }

  // The module's weight as fp32, row-major [out, in].
  static std::vector<float> linear_f32(model::WeightReader& r, const std::string& module, std::int64_t out,
                                       std::int64_t in) {
    // A quantized module read by a dense setup: say so, rather than "missing tensor" or "dtype U8".
    if (r.has(module + ".qweight"))
      throw Error(r.checkpoint().get(module + ".qweight").file.string() + ": tensor '" + module + ".qweight'",
                  "the module is stored quantized (AWQ/GPTQ); run it with the matching quant setup, not dense");
    if (r.has(module + ".weight.quant_state.bitsandbytes__nf4"))
      throw Error(r.checkpoint().get(module + ".weight").file.string() + ": tensor '" + module + ".weight'",
                  "the module is stored quantized (bitsandbytes NF4); run it with the nf4 quant setup, not dense");
    return r.f32(module + ".weight", {out, in});
  }
};

}  // namespace fpf::quant
