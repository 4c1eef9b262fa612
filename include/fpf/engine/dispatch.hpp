#pragma once
// Run-time names -> compile-time Setups. The instantiations a program can run are listed here explicitly (DESIGN.md
// "Bound compile time"): fn.template operator()<Setup>() is called with the one the names select.
#include <string>
#include <string_view>

#include <fpf/attention/attention.hpp>
#include <fpf/backend/cpu/backend.hpp>
#include <fpf/core/error.hpp>
#include <fpf/engine/setup.hpp>
#include <fpf/quant/dense.hpp>

namespace fpf {

template <class Fn>
int with_setup(std::string_view backend, std::string_view attention, Fn&& fn) {
  if (attention != "eager" && attention != "flash")
    throw Error("--attention", "unknown attention '" + std::string(attention) + "' (eager or flash)");
  if (backend == "cpu") {
    if (attention == "eager") return fn.template operator()<Setup<quant::Dense, attn::Eager, par::Single, cpu::Backend>>();
    return fn.template operator()<Setup<quant::Dense, attn::Flash<>, par::Single, cpu::Backend>>();
  }
  if (backend == "cuda") throw Error("--backend", "the CUDA backend is not part of this build yet (use cpu)");
  throw Error("--backend", "unknown backend '" + std::string(backend) + "' (cpu or cuda)");
}

}  // namespace fpf
