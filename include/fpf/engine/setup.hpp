#pragma once
// Setup<Quant, Attention, Parallel, Backend, Exec>: one point of the ablation matrix as a bundle of compile-time
// policies (DESIGN.md "The idea in one paragraph"). The engine is written against the concepts below only; an
// experiment main instantiates the few Setups it compares.
#include <concepts>
#include <string_view>

#include <fpf/attention/attention.hpp>

namespace fpf {

namespace exec {
// Kernel by kernel, as the ops are written. (exec::Graph, CUDA graph capture + fused kernels, comes with the
// compile experiment.)
struct Eager {
  static constexpr std::string_view name = "eager";
};
}  // namespace exec

namespace par {
// One device holds the whole model. Tensor<N> and Expert<N> come with experiments 7 and 8.
struct Single {
  static constexpr std::string_view name = "single";
  static constexpr int tp_size = 1;
  static constexpr int ep_size = 1;
};
}  // namespace par

template <class P>
concept ParallelLayout = requires {
  { P::name } -> std::convertible_to<std::string_view>;
  { P::tp_size } -> std::convertible_to<int>;
  { P::ep_size } -> std::convertible_to<int>;
};

template <class E>
concept ExecMode = requires {
  { E::name } -> std::convertible_to<std::string_view>;
};

template <class Q>
concept QuantScheme = requires {
  { Q::name } -> std::convertible_to<std::string_view>;
};

template <class B>
concept Backend = requires {
  { B::name } -> std::convertible_to<std::string_view>;
};

template <QuantScheme Quant, attn::AttentionKernel Attention, ParallelLayout Parallel, Backend BackendT,
          ExecMode Exec = exec::Eager>
struct Setup {
  using quant = Quant;
  using attention = Attention;
  using parallel = Parallel;
  using backend = BackendT;
  using exec = Exec;
};

}  // namespace fpf
