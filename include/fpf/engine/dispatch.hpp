#pragma once
// Run-time names -> compile-time Setups. The instantiations a program can run are listed here explicitly (DESIGN.md
// "Bound compile time"): fn.template operator()<Setup>() is called with the one the names select.
//
// The CUDA Setups exist only in translation units compiled by nvcc (__CUDACC__) in a build with the CUDA backend
// (FPF_WITH_CUDA adds examples that need it as CUDA sources, see examples/CMakeLists.txt); a plain C++ build keeps
// compiling the same program, and `--backend cuda` then says that this build has no CUDA backend.
#include <filesystem>
#include <string>
#include <string_view>

#include <fpf/attention/attention.hpp>
#include <fpf/backend/cpu/backend.hpp>
#include <fpf/core/error.hpp>
#include <fpf/engine/setup.hpp>
#include <fpf/quant/awq.hpp>
#include <fpf/quant/config.hpp>
#include <fpf/quant/dense.hpp>
#include <fpf/quant/gptq.hpp>
#include <fpf/quant/nf4.hpp>

#if defined(__CUDACC__)
#include <fpf/backend/cuda/backend.cuh>
#define FPF_HAVE_CUDA_BACKEND 1
#endif

namespace fpf {

namespace dispatch_detail {

template <class Q, class Fn>
int with_attention_cpu(std::string_view attention, Fn& fn) {
  if (attention == "eager") return fn.template operator()<Setup<Q, attn::Eager, par::Single, cpu::Backend>>();
  return fn.template operator()<Setup<Q, attn::Flash<>, par::Single, cpu::Backend>>();
}

#if defined(FPF_HAVE_CUDA_BACKEND)
template <class Q, class Fn>
int with_attention_cuda(std::string_view attention, Fn& fn) {
  if (attention == "eager") return fn.template operator()<Setup<Q, attn::Eager, par::Single, cuda::Backend>>();
  return fn.template operator()<Setup<Q, attn::Flash<>, par::Single, cuda::Backend>>();
}
#endif

}  // namespace dispatch_detail

// quant: "dense", "awq", "gptq" or "nf4" (quant::policy_name of the checkpoint's quantization_config).
template <class Fn>
int with_setup(std::string_view backend, std::string_view attention, std::string_view quant, Fn&& fn) {
  if (attention != "eager" && attention != "flash")
    throw Error("--attention", "unknown attention '" + std::string(attention) + "' (eager or flash)");
  if (quant != "dense" && quant != "awq" && quant != "gptq" && quant != "nf4")
    throw Error("quantization_config", "unknown scheme '" + std::string(quant) + "' (dense, awq, gptq or nf4)");
  if (backend == "cpu") {
    if (quant == "awq") return dispatch_detail::with_attention_cpu<quant::Awq<4>>(attention, fn);
    if (quant == "gptq") return dispatch_detail::with_attention_cpu<quant::Gptq<4>>(attention, fn);
    if (quant == "nf4") return dispatch_detail::with_attention_cpu<quant::Nf4>(attention, fn);
    return dispatch_detail::with_attention_cpu<quant::Dense>(attention, fn);
  }
  if (backend == "cuda") {
#if defined(FPF_HAVE_CUDA_BACKEND)
    if (quant == "awq") return dispatch_detail::with_attention_cuda<quant::Awq<4>>(attention, fn);
    if (quant == "gptq") return dispatch_detail::with_attention_cuda<quant::Gptq<4>>(attention, fn);
    if (quant == "nf4") return dispatch_detail::with_attention_cuda<quant::Nf4>(attention, fn);
    return dispatch_detail::with_attention_cuda<quant::Dense>(attention, fn);
#else
    throw Error("--backend", "this build has no CUDA backend (build with nvcc and FPF_WITH_CUDA=ON; use cpu)");
#endif
  }
  throw Error("--backend", "unknown backend '" + std::string(backend) + "' (cpu or cuda)");
}

// The checkpoint's own scheme, read from config.json's quantization_config.
template <class Fn>
int with_setup_for(const std::filesystem::path& model_dir, std::string_view backend, std::string_view attention,
                   Fn&& fn) {
  return with_setup(backend, attention, quant::policy_name(quant::load_quant_config(model_dir)), fn);
}

// Unquantized checkpoints.
template <class Fn>
int with_setup(std::string_view backend, std::string_view attention, Fn&& fn) {
  return with_setup(backend, attention, "dense", fn);
}

}  // namespace fpf
