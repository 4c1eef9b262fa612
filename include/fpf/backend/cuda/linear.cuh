#pragma once
// cuda::Linear<T>: E matrices [N, K] with one input (a Linear, fused q/k/v or gate/up rows, or a layer's experts),
// stored dense as T or 4-bit packed (q::Weight), behind three products:
//   apply   Y[M, N] = X W^T                (E == 1): dense -> Gemm::linear; packed -> fused dequant GEMV for M <= 8,
//                                           else dequantize to T into a scratch matrix and the same Gemm::linear
//   moe_gemv  per slot p: Y[p] = W_{ids[p]} X[p / x_div]   (decode MoE, expert ids read on the device)
//   moe_gemv_swiglu  the same over gate_up rows, then the SwiGLU (fused for 4-bit weights)
//   moe_gemv_combine the same over down rows, then the weighted sum into the residual (fused for 4-bit weights)
//   expert  Y[M, N] = X W_e^T              (prefill MoE, one expert's grouped rows)
//   experts_grouped / experts_batched       (prefill MoE, all experts in one product: grouped_gemm.cuh in bf16/fp16,
//                                           cuBLASLt strided-batched on rows padded to the largest count in fp32)
// Packed rows may be split into parts along N (modules whose packing differs, e.g. act-order q/k/v with different
// permutations); each part writes its own columns of Y.
#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include <fpf/backend/cuda/common.cuh>
#include <fpf/backend/cuda/gemm.cuh>
#include <fpf/backend/cuda/grouped_gemm.cuh>
#include <fpf/backend/cuda/ops.cuh>
#include <fpf/backend/cuda/qlinear.cuh>
#include <fpf/quant/packed.hpp>

namespace fpf::cuda {

template <class T>
class Linear {
 public:
  struct Part {
    q::Weight w;
    int row0 = 0;
  };

  void set_shape(int E, int N, int K) { E_ = E, N_ = N, K_ = K; }
  DeviceBuffer<T>& dense() { return dense_; }
  const T* dense_matrix(int e) const { return dense_.get() + static_cast<std::size_t>(e) * N_ * K_; }
  void add_part(q::Weight&& w, int row0) { parts_.push_back(Part{std::move(w), row0}); }

  bool quantized() const { return !parts_.empty(); }
  int N() const { return N_; }
  int K() const { return K_; }
  // Device bytes one matrix occupies (what a product over all of its rows reads).
  std::size_t bytes_per_matrix() const {
    if (!quantized()) return static_cast<std::size_t>(N_) * K_ * sizeof(T);
    std::size_t b = 0;
    for (const Part& p : parts_) b += p.w.bytes_per_matrix();
    return b;
  }
  // Appends the weight's device arrays (for ops::prefetch_l2).
  void device_ranges(ops::PrefetchList& l) const {
    if (!quantized()) return l.add(dense_.get(), static_cast<std::size_t>(E_) * N_ * K_ * sizeof(T));
    for (const Part& p : parts_) p.w.device_ranges(l);
  }
  // T elements the prefill path's dequantized matrix needs.
  std::size_t scratch_elems() const { return quantized() ? static_cast<std::size_t>(N_) * K_ : 0; }

  void apply(Gemm& g, const T* X, int M, T* Y, T* scratch, cudaStream_t s = 0) const {
    if (!quantized()) return g.linear<T>(X, M, dense_.get(), N_, K_, Y, s);
    if (M <= ops::kGemvMaxRows) {
      for (const Part& p : parts_) p.w.template gemv<T>(X, M, K_, Y + p.row0, N_, s);
      return;
    }
    expert(g, 0, X, M, Y, scratch, s);
  }

  void moe_gemv(const T* X, int x_div, const std::int32_t* ids, int slots, T* Y, cudaStream_t s = 0) const {
    if (!quantized()) return ops::moe_gemv<T>(X, x_div, dense_.get(), ids, slots, N_, K_, Y, s);
    for (const Part& p : parts_) p.w.template moe_gemv<T>(X, K_, x_div, ids, slots, Y + p.row0, N_, s);
  }

  // moe_gemv over gate_up rows (gate first), then the SwiGLU: A[p] = silu(Y[p, :N/2]) * Y[p, N/2:] (ops::swiglu's
  // values). 4-bit weights of one part: one fused kernel (q::Weight::moe_gemv_swiglu) that never writes Y; else
  // moe_gemv into Y and ops::swiglu.
  void moe_gemv_swiglu(const T* X, int x_div, const std::int32_t* ids, int slots, T* Y, T* A, cudaStream_t s = 0) const {
    if (parts_.size() == 1 && parts_.front().w.template moe_gemv_swiglu<T>(X, K_, x_div, ids, slots, A, N_ / 2, s)) return;
    moe_gemv(X, x_div, ids, slots, Y, s);
    ops::swiglu<T>(Y, A, static_cast<std::size_t>(slots), N_ / 2, s);
  }

  // moe_gemv into Y (slots = tokens k, activation row p for slot p), then ops::moe_combine into Xres (row stride
  // ldres, slots in order, weights wts). 4-bit weights of one part: one kernel (q::Weight::moe_gemv_combine) that
  // never writes Y; same bits.
  void moe_gemv_combine(const T* X, const std::int32_t* ids, const float* wts, int tokens, int k, T* Y, T* Xres, long long ldres,
                        cudaStream_t s = 0) const {
    if (parts_.size() == 1 && parts_.front().w.template moe_gemv_combine<T>(X, K_, ids, wts, tokens, k, Xres, ldres, s)) return;
    moe_gemv(X, 1, ids, tokens * k, Y, s);
    ops::moe_combine<T>(Xres, Y, nullptr, wts, tokens, k, static_cast<int>(ldres), s);
  }

  // All E matrices in one product on inputs padded to Mmax rows each (prefill MoE): Y_e = X_e W_e^T with X
  // [E, Mmax, K], Y [E, Mmax, N]. Packed matrices are first dequantized, all E of them, into scratch
  // (batched_scratch_elems()). Rows are independent, so padding rows change nothing for the real ones.
  std::size_t batched_scratch_elems() const { return quantized() ? static_cast<std::size_t>(E_) * N_ * K_ : 0; }
  void experts_batched(Gemm& g, const T* X, int Mmax, T* Y, T* scratch, cudaStream_t s = 0) const {
    g.linear_batched<T>(X, Mmax, all_experts(scratch, s), N_, K_, Y, E_, static_cast<long long>(Mmax) * K_,
                        static_cast<long long>(N_) * K_, static_cast<long long>(Mmax) * N_, s);
  }
  // All E matrices in one grouped product (bf16/fp16, grouped_gemm.cuh): rows offsets[e] .. offsets[e + 1] - 1 of X
  // (offsets on the device) are expert e's; no padding, no host round trip.
  static constexpr bool kGrouped = !std::is_same_v<T, float>;
  void experts_grouped(const T* X, const std::int32_t* d_offsets, int rows, T* Y, T* scratch, cudaStream_t s = 0) const {
    if constexpr (kGrouped) grouped_linear<T>(X, d_offsets, E_, rows, all_experts(scratch, s), N_, K_, Y, s);
    else throw Error("Linear", "grouped products are bf16/fp16 only");
  }

  void expert(Gemm& g, int e, const T* X, int M, T* Y, T* scratch, cudaStream_t s = 0) const {
    if (M == 0) return;
    if (!quantized()) return g.linear<T>(X, M, dense_matrix(e), N_, K_, Y, s);
    for (const Part& p : parts_) p.w.template dequantize<T>(e, scratch + static_cast<std::size_t>(p.row0) * K_, K_, s);
    g.linear<T>(X, M, scratch, N_, K_, Y, s);
  }

 private:
  // The E matrices as T [E, N, K]: the dense weights, or the packed ones dequantized into scratch.
  const T* all_experts(T* scratch, cudaStream_t s) const {
    if (!quantized()) return dense_.get();
    for (int e = 0; e < E_; ++e)
      for (const Part& p : parts_) p.w.template dequantize<T>(e, scratch + (static_cast<std::size_t>(e) * N_ + p.row0) * K_, K_, s);
    return scratch;
  }

  int E_ = 0, N_ = 0, K_ = 0;
  DeviceBuffer<T> dense_;
  std::vector<Part> parts_;
};

// fn(i, t) for i < n on `threads` worker threads (t: the thread's index), items taken in order; the first exception
// is rethrown once all threads are done.
template <class Fn>
void parallel_for(std::size_t n, std::size_t threads, Fn&& fn) {
  std::atomic<std::size_t> next{0};
  std::exception_ptr error;
  std::mutex mu;
  std::vector<std::thread> pool;
  for (std::size_t t = 0; t < std::min(n, threads); ++t)
    pool.emplace_back([&, t] {
      for (std::size_t i; (i = next++) < n;) {
        try {
          fn(i, t);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu);
          if (!error) error = std::current_exception();
        }
      }
    });
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

// Runs the packers (pure repacking work) on all cores; results in input order, so nothing depends on the thread
// count.
inline std::vector<quant::Packed4> run_packers(const std::vector<quant::Packer>& packers) {
  std::vector<quant::Packed4> out(packers.size());
  parallel_for(packers.size(), std::max(1u, std::thread::hardware_concurrency()),
               [&](std::size_t i, std::size_t) { out[i] = packers[i](); });
  return out;
}

// Runs fn(i, uploader) for i < n on up to uploaders.size() threads, thread t using uploaders[t].
template <class Fn>
void parallel_upload(std::size_t n, std::vector<std::unique_ptr<PinnedUploader>>& uploaders, Fn&& fn) {
  parallel_for(n, uploaders.size(), [&](std::size_t i, std::size_t t) { fn(i, *uploaders[t]); });
}

// Packed modules sharing an input, E matrices each: parts[j][e] is module j of matrix e (e.g. j = gate, up).
// One weight with the modules' rows concatenated when every matrix allows it, else one weight per module; the
// parts are copied straight into their rows, in parallel (one pinned uploader per thread).
template <class T>
void upload_packed(Linear<T>& lin, const std::vector<std::vector<quant::Packed4>>& parts,
                   std::vector<std::unique_ptr<PinnedUploader>>& uploaders) {
  const std::size_t E = parts.front().size(), J = parts.size();
  bool concat = J > 1;
  for (std::size_t e = 0; e < E && concat; ++e) {
    std::vector<const quant::Packed4*> row;
    for (const auto& p : parts) row.push_back(&p[e]);
    concat = quant::can_concat(row);
  }
  if (concat) {
    std::vector<const quant::Packed4*> proto;
    for (const auto& p : parts) proto.push_back(&p.front());
    q::Weight w;
    w.allocate(static_cast<int>(E), proto);
    parallel_upload(E * J, uploaders, [&](std::size_t i, PinnedUploader& up) {
      w.copy_part(static_cast<int>(i / J), static_cast<int>(i % J), parts[i % J][i / J], up);
    });
    lin.add_part(std::move(w), 0);
    return;
  }
  int row0 = 0;
  for (const auto& p : parts) {
    q::Weight w;
    w.allocate(static_cast<int>(E), {&p.front()});
    parallel_upload(E, uploaders, [&](std::size_t e, PinnedUploader& up) { w.copy_part(static_cast<int>(e), 0, p[e], up); });
    lin.add_part(std::move(w), row0);
    row0 += static_cast<int>(p.front().N);
  }
}

}  // namespace fpf::cuda
