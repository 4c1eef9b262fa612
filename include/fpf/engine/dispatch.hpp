#pragma once
// Run-time names -> compile-time Setups. The instantiations a program can run are listed here explicitly (DESIGN.md
// "Bound compile time"): fn.template operator()<Setup>() is called with the one the names select.
//
// The CUDA Setups exist only in translation units compiled by nvcc (__CUDACC__) in a build with the CUDA backend
// (FPF_WITH_CUDA adds examples that need it as CUDA sources, see examples/CMakeLists.txt); a plain C++ build keeps
// compiling the same program, and `--backend cuda` then says that this build has no CUDA backend.
#include <string>
#include <string_view>

#include <fpf/attention/attention.hpp>
#include <fpf/backend/cpu/backend.hpp>
#include <fpf/core/error.hpp>
#include <fpf/engine/setup.hpp>
#include <fpf/quant/dense.hpp>

#if defined(__CUDACC__)
#include <fpf/backend/cuda/backend.cuh>
#define FPF_HAVE_CUDA_BACKEND 1
#endif

namespace fpf {

template <class Fn>
int with_setup(std::string_view backend, std::string_view attention, Fn&& fn) {
  if (attention != "eager" && attention != "flash")
    throw Error("--attention", "unknown attention '" + std::string(attention) + "' (eager or flash)");
  if (backend == "cpu") {
    if (attention == "eager") return fn.template operator()<Setup<quant::Dense, attn::Eager, par::Single, cpu::Backend>>();
    return fn.template operator()<Setup<quant::Dense, attn::Flash<>, par::Single, cpu::Backend>>();
  }
  if (backend == "cuda") {
#if defined(FPF_HAVE_CUDA_BACKEND)
    if (attention == "eager") return fn.template operator()<Setup<quant::Dense, attn::Eager, par::Single, cuda::Backend>>();
    return fn.template operator()<Setup<quant::Dense, attn::Flash<>, par::Single, cuda::Backend>>();
#else
    throw Error("--backend", "this build has no CUDA backend (build with nvcc and FPF_WITH_CUDA=ON; use cpu)");
#endif
  }
  throw Error("--backend", "unknown backend '" + std::string(backend) + "' (cpu or cuda)");
}

}  // namespace fpf
