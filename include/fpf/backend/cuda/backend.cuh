#pragma once
// cuda::Backend: the Qwen3 / Qwen3-MoE forward on one NVIDIA GPU, behind the same Model interface as cpu::Backend
// (reset(batch), forward(chunks, taps) -> Captured per sequence), so fpf::Engine drives both the same way.
//
// Storage type T = float (fp32 mode, for parity with the CPU reference), bf16 or fp16; every op accumulates in fp32
// and rounds its output once to T. Ops: cuBLASLt for the dense products (gemm.cuh: algorithm pinned per shape,
// no split-K, no TF32; <= 8 rows go to a warp-per-output GEMV), own kernels for the rest (ops.cuh), the attention
// policy's CUDA kernel (attention/cuda.cuh).
//
// Batching: the rows of all sequences are concatenated (no padding); each row carries its sequence and absolute
// position, and each sequence has its own KV cache, so a row can only ever see its own sequence's keys. What batch
// neighbours can change is the shape of the products (the number of rows, the tokens routed to each expert), hence
// the algorithm cuBLASLt runs for them: that is the batch-size effect experiment 1 measures.
//
// MoE: the router (softmax over all experts in fp32, top-k ties to the lower id, optional renormalisation) runs on
// the GPU; with at most 8 rows the selected experts run as per-slot GEMVs; with more, the slots are grouped by
// expert (a stable counting sort on the device, ops::route_group: ascending expert, then ascending slot) and all
// experts run as one product per projection (4-bit experts dequantized to T first): in bf16/fp16 the grouped GEMM of
// grouped_gemm.cuh, which reads the expert offsets on the device (a row's value does not depend on how many rows
// its expert has); in fp32 cuBLASLt strided-batched on rows padded to the largest expert's count (or, when padding
// would more than double the rows, one cuBLASLt product per expert). The weighted sum over a row's experts is taken
// in ascending expert id, as the CPU reference.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <variant>
#include <vector>

#include <fpf/attention/cuda.cuh>
#include <fpf/backend/interface.hpp>
#include <fpf/backend/cuda/common.cuh>
#include <fpf/backend/cuda/gemm.cuh>
#include <fpf/backend/cuda/linear.cuh>
#include <fpf/backend/cuda/ops.cuh>
#include <fpf/core/error.hpp>
#include <fpf/engine/options.hpp>
#include <fpf/io/config.hpp>
#include <fpf/io/safetensors.hpp>
#include <fpf/model/qwen3.hpp>
#include <fpf/model/rope.hpp>
#include <fpf/model/weights.hpp>
#include <fpf/quant/dense.hpp>
#include <fpf/quant/packed.hpp>
#include <fpf/taps/capture.hpp>

namespace fpf::cuda {

struct Backend {
  static constexpr std::string_view name = "cuda";
  template <class S>
  class Model;
};

// Throws unless a CUDA device is usable; returns its name.
inline std::string require_device() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0)
    throw Error("--backend cuda", std::string("no usable CUDA device (") + (e != cudaSuccess ? cudaGetErrorString(e) : "0 devices") + ")");
  cudaDeviceProp p{};
  FPF_CUDA(cudaGetDeviceProperties(&p, 0));
  return p.name;
}

namespace detail {

// A blocking stream (by default): work on it orders with the legacy default stream that cudaMemcpy uses (uploads and
// downloads).
inline cudaStream_t make_stream(unsigned flags = cudaStreamDefault) {
  cudaStream_t s{};
  FPF_CUDA(cudaStreamCreateWithFlags(&s, flags));
  return s;
}
inline cudaEvent_t make_event() {
  cudaEvent_t e{};
  FPF_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

// FPF_CUDA_PROFILE=1: synchronizes after each stage of the forward and prints where the time went (one line per
// forward to stderr). Off by default (no synchronisation, no output).
class StageTimer {
 public:
  StageTimer() : on_(std::getenv("FPF_CUDA_PROFILE") != nullptr && std::string(std::getenv("FPF_CUDA_PROFILE")) != "0") {}
  void start() {
    if (!on_) return;
    FPF_CUDA(cudaDeviceSynchronize());
    ms_.clear();
    t_ = t0_ = std::chrono::steady_clock::now();
  }
  void mark(const char* stage) {
    if (!on_) return;
    FPF_CUDA(cudaDeviceSynchronize());
    const auto now = std::chrono::steady_clock::now();
    ms_[stage] += std::chrono::duration<double, std::milli>(now - t_).count();
    t_ = now;
  }
  bool on() const { return on_; }
  void report(int rows) {
    if (!on_) return;
    std::fprintf(stderr, "[fpf cuda profile] rows %d: total %.2f ms:", rows,
                 std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count());
    for (const auto& [k, v] : ms_) std::fprintf(stderr, " %s %.2f", k.c_str(), v);
    std::fprintf(stderr, "\n");
  }

 private:
  bool on_;
  std::chrono::steady_clock::time_point t0_, t_;
  std::map<std::string, double> ms_;
};

// Copies a checkpoint tensor's elements [offset, offset + count) to dst as T (exact when widening).
class Uploader {
 public:
  template <class T>
  void operator()(const io::TensorInfo& t, std::size_t offset, std::size_t count, T* dst) {
    const std::size_t es = dtype_size(t.dtype);
    const std::byte* src = t.bytes.data() + offset * es;
    if (t.dtype == dtype_of<T>()) {
      pinned_.copy(dst, src, count * es);  // the mmapped source outlives the copy; load() synchronizes at the end
      return;
    }
    constexpr std::size_t kChunk = 64u << 20;  // bytes staged per conversion
    staging_.resize(kChunk);
    const std::size_t per = kChunk / es;
    for (std::size_t done = 0; done < count; done += per) {
      const std::size_t n = std::min(per, count - done);
      FPF_CUDA(cudaMemcpy(staging_.get(), src + done * es, n * es, cudaMemcpyHostToDevice));
      ops::convert<T>(staging_.get(), t.dtype, dst + done, n);
    }
    FPF_CUDA(cudaDeviceSynchronize());
  }

 private:
  DeviceBuffer<std::byte> staging_;
  PinnedUploader pinned_;
  std::vector<std::unique_ptr<PinnedUploader>> parallel_;

 public:
  // Uploaders for worker threads (repacked 4-bit weights), made on first use: 2 x 16 MiB pinned each.
  std::vector<std::unique_ptr<PinnedUploader>>& parallel() {
    if (parallel_.empty()) {
      const unsigned n = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
      for (unsigned i = 0; i < n; ++i) parallel_.push_back(std::make_unique<PinnedUploader>(16u << 20));
    }
    return parallel_;
  }
};

template <class T>
struct LayerW {
  DeviceBuffer<float> input_norm, post_norm, q_norm, k_norm;
  Linear<T> qkv, o;      // [q_dim + 2 kv_dim, H], [H, q_dim]
  bool moe = false;
  Linear<T> gate_up, down;  // dense MLP: [2I, H], [H, I]; MoE: E x [2I, H], E x [H, I] (gate rows first)
  Linear<T> router;         // [E, H]
};

// How the setup's Quant policy stores a Linear: quantized (then its packer gives the 4-bit form) or dense.
struct QuantFns {
  std::function<bool(const model::WeightReader&, const std::string&)> quantized;
  std::function<quant::Packer(model::WeightReader&, const std::string&, std::int64_t, std::int64_t)> packer;
};
template <class Quant>
QuantFns quant_fns() {
  return {[](const model::WeightReader& r, const std::string& m) { return Quant::quantized(r, m); },
          [](model::WeightReader& r, const std::string& m, std::int64_t out, std::int64_t in) {
            return Quant::packer(r, m, out, in);
          }};
}

// The whole model for one storage type and one attention policy.
template <class Attention, class T>
class Impl {
 public:
  Impl(const io::Checkpoint& ckpt, const io::ModelConfig& cfg, const QuantFns& qf) : cfg_(cfg) {
    load(ckpt, qf);
    router_count_.resize(1);
    FPF_CUDA(cudaMemset(router_count_.get(), 0, sizeof(unsigned)));
    const std::vector<float> inv = model::rope_inv_freq(cfg.rope_theta, cfg.head_dim);
    inv_freq_.upload(inv);
  }

  ~Impl() {
    if (pending_.on) cudaStreamSynchronize(stream_);  // a speculative step still in flight (pipelining)
    graphs_by_key_.clear();
    if (stream_) cudaStreamDestroy(stream_);
    if (side_) cudaStreamDestroy(side_);
    if (fork_ev_) cudaEventDestroy(fork_ev_);
    if (join_ev_) cudaEventDestroy(join_ev_);
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  // Decode steps that were already running when forward asked for them (pipelining).
  std::size_t adopted_steps() const { return adopted_; }

  void reset(int batch) {
    drain();
    seqs_.resize(static_cast<std::size_t>(batch));
    for (Seq& s : seqs_) s.len = 0;
    batch_ = batch;
  }

  std::vector<Captured> forward(std::span<const Chunk> chunks, const taps::TapSpec& spec) {
    if (static_cast<int>(chunks.size()) != batch_) throw Error("forward", "batch size changed without reset()");
    const int B = batch_, H = cfg_.hidden_size, D = cfg_.head_dim, nh = cfg_.num_attention_heads,
              nkv = cfg_.num_key_value_heads;
    const int q_dim = nh * D, kv_dim = nkv * D, qkv_dim = q_dim + 2 * kv_dim;
    const float eps = static_cast<float>(cfg_.rms_norm_eps);
    const long long V = cfg_.vocab_size;
    const auto t_entry = std::chrono::steady_clock::now();

    // Pipelining: the step the previous forward queued behind its own (see "speculate" below) is this one when every
    // sequence gets one token, the argmax read back for it, at the length it was queued at, with the same taps; it is
    // then adopted as it runs. Otherwise it is waited for and dropped: it wrote its own slot, the shared scratch and
    // each sequence's cache row at its current length, which this step rewrites before any read (or never reads).
    bool adopt = false;
    if (pending_.on) {
      adopt = pending_.spec.layers == spec.layers && pending_.spec.positions == spec.positions &&
              pending_.spec.topk == spec.topk;
      for (int b = 0; adopt && b < B; ++b) {
        const Chunk& c = chunks[static_cast<std::size_t>(b)];
        adopt = c.tokens.size() == 1 && c.tokens[0] == pending_.token[static_cast<std::size_t>(b)] &&
                seqs_[b].len == pending_.len[static_cast<std::size_t>(b)];
      }
      if (!adopt) drain();
    }
    // This step's slot: the other one than the last step's, which a step queued behind this one will take (without
    // pipelining, always the first: nothing is ever left in flight, and one graph per shape is captured).
    const int si = adopt ? pending_.slot : pipeline_ ? 1 - last_slot_ : 0;

    // ---- rows: every sequence's new tokens, concatenated ----
    std::vector<std::int32_t> ids, row_seq, row_pos, cap_rows, cap_of_row;  // capture i's row; row r's capture or -1
    std::vector<int> p0(B), c0(B), first_row(B);
    int max_keys = 0;
    for (int b = 0; b < B; ++b) {
      const Chunk& c = chunks[static_cast<std::size_t>(b)];
      const int Tn = static_cast<int>(c.tokens.size());
      p0[b] = seqs_[b].len;
      c0[b] = std::clamp(c.capture_from - p0[b], 0, std::max(Tn - 1, 0));
      first_row[b] = static_cast<int>(ids.size());
      for (int t = 0; t < Tn; ++t) {
        const std::int32_t id = c.tokens[static_cast<std::size_t>(t)];
        if (id < 0 || id >= cfg_.vocab_size)
          throw Error("prompt", "token id " + std::to_string(id) + " is outside the vocabulary (vocab_size " +
                                    std::to_string(cfg_.vocab_size) + ")");
        cap_of_row.push_back(t >= c0[b] ? static_cast<std::int32_t>(cap_rows.size()) : -1);
        if (t >= c0[b]) cap_rows.push_back(static_cast<std::int32_t>(ids.size()));
        ids.push_back(id);
        row_seq.push_back(b);
        row_pos.push_back(p0[b] + t);
      }
      max_keys = std::max(max_keys, p0[b] + Tn);
      ensure_capacity(seqs_[b], p0[b] + Tn);
    }
    bool moved = upload_cache_tables();  // a buffer a captured graph points into was reallocated
    const int R = static_cast<int>(ids.size()), Nc = static_cast<int>(cap_rows.size());
    if (R == 0) throw Error("forward", "no tokens given");
    // The step's metadata: ids, row_seq, row_pos (R each), cap_rows (Nc), cap_of_row (R), and src (R): row r's token is
    // ids[r] where src[r] < 0, else word src[r] of the other slot's read-back (an argmax of the step before; only a
    // speculative step has such rows). Uploaded from the slot's page-locked memory by the step's first operation (run
    // below; a kernel in a decode step's graph, ops::copy_words); written just before the launch.
    // The rows' sequences and captures are this step's; ids, positions and src are given (a queued step's differ).
    auto pack_meta = [&](std::span<const std::int32_t> id, std::span<const std::int32_t> pos, std::span<const std::int32_t> src) {
      std::vector<std::int32_t> m;
      m.reserve(5 * static_cast<std::size_t>(R) + Nc);
      for (auto part : {id, std::span<const std::int32_t>(row_seq), pos, std::span<const std::int32_t>(cap_rows),
                        std::span<const std::int32_t>(cap_of_row), src})
        m.insert(m.end(), part.begin(), part.end());
      return m;
    };
    const std::vector<std::int32_t> meta = pack_meta(ids, row_pos, std::vector<std::int32_t>(static_cast<std::size_t>(R), -1));
    const std::size_t n_meta = meta.size();
    for (Slot& sl : slot_) moved |= sl.meta.resize(n_meta), moved |= sl.meta_host.reserve(n_meta);
    // Set by run for the slot it runs in.
    const std::int32_t *d_ids = nullptr, *d_seq = nullptr, *d_pos = nullptr, *d_cap = nullptr, *d_cap_of_row = nullptr,
                       *d_src = nullptr;

    const int E = cfg_.num_experts, k = cfg_.num_experts_per_tok;
    const int I = cfg_.intermediate_size, Ie = cfg_.moe_intermediate_size;
    const std::size_t P = static_cast<std::size_t>(R) * std::max(k, 1);
    moved |= x_.resize(static_cast<std::size_t>(R) * H);
    moved |= h_.resize(static_cast<std::size_t>(R) * H);
    moved |= tmp_.resize(static_cast<std::size_t>(R) * H);
    moved |= qkv_.resize(static_cast<std::size_t>(R) * qkv_dim);
    moved |= att_.resize(static_cast<std::size_t>(R) * q_dim);
    moved |= gu_.resize(std::max<std::size_t>(static_cast<std::size_t>(R) * 2 * I, P * 2 * Ie) + 1);
    moved |= act_.resize(std::max<std::size_t>(static_cast<std::size_t>(R) * I, P * Ie) + 1);
    if (cfg_.is_moe()) {
      moved |= ye_.resize(P * H);
      moved |= xg_.resize(P * H);
      moved |= rlogits_.resize(static_cast<std::size_t>(R) * E);
      moved |= route_ids_.resize(4 * P + E + 3);  // ids; prefill: grouped rows (<= 2 P), slot -> row, offsets
      moved |= route_wts_.resize(P);
    }
    // Decode (<= kSplitMaxRows rows) sizes the attention's key split by the caches' capacity, not by this step's key
    // count, so every kernel argument stays the same from step to step and the step can be replayed as a CUDA graph.
    // The kernels read each row's own key count (row_pos) on the device; the extra chunks are empty and add exact
    // zeros, so the values do not depend on it.
    const bool decode = R <= attn::kSplitMaxRows;
    const bool as_graph = decode && graphs_ && !timer_.on();  // the step replays a captured graph
    int kernel_keys = max_keys;
    if (decode) {
      for (int b = 0; b < B; ++b) kernel_keys = std::max(kernel_keys, seqs_[b].capacity);
      moved |= attn_scratch_.resize(attn::split_scratch_floats(R, nh, D, kernel_keys));
    }
    const std::set<int> tapped(spec.layers.begin(), spec.layers.end());
    const std::size_t tap_block = static_cast<std::size_t>(Nc) * (H + kv_dim);
    // What the host reads back, in one device buffer (one copy per step): the taps' stage, the top-k log-probs, the
    // top-k ids and the argmaxes (int32 in the buffer's 4-byte words).
    const std::size_t n_stage = tapped.size() * tap_block, n_lp = static_cast<std::size_t>(Nc) * spec.topk,
                      n_top = static_cast<std::size_t>(Nc) * (spec.topk + 1), n_out = n_stage + n_lp + n_top;
    for (Slot& sl : slot_) moved |= sl.out.resize(n_out), moved |= sl.out_host.reserve(n_out);
    float* d_stage = nullptr;  // set by run for its slot
    float* d_top_lp = nullptr;
    std::int32_t* d_top = nullptr;
    // Tapped layer t's block of the stage: [Nc, H] hidden states, then [Nc, kv_dim] keys. The taps are copied inside the
    // kernels that read or write those values (no launch of their own): the hidden state after layer t by the next
    // RMSNorm that reads it (layer t + 1's input norm, or the final norm), layer t's keys by its q/k norm + RoPE.
    auto tap_block_of = [&](int t) -> float* {
      const auto it = tapped.find(t);
      if (it == tapped.end()) return nullptr;
      return d_stage + static_cast<std::size_t>(std::distance(tapped.begin(), it)) * tap_block;
    };
    moved |= hc_.resize(static_cast<std::size_t>(Nc) * H);
    moved |= logits_.resize(static_cast<std::size_t>(Nc) * V);
    moved |= lsm_.reserve(Nc, V, spec.topk);

    const cudaStream_t st = stream_;
    // Decode: layer l + 1's KV caches (up to each row's position) into L2 once layer l's o product is launched, and
    // its q/k/v, o and router weights once layer l's gate_up product is: on a side stream (ops::prefetch_l2, issue
    // only), so the bytes move while layer l's later kernels run and layer l + 1 reads them from L2. The side
    // stream joins the main one at the end of the step. Values are unchanged: a prefetch moves bytes into L2 only.
    bool side_used = false;
    auto prefetch_next = [&](int ln, bool kv) {
      if (!decode || !l2_prefetch_ || ln >= cfg_.num_hidden_layers) return;
      ops::PrefetchList w;
      T* const* kc = nullptr;
      T* const* vc = nullptr;
      if (kv) {
        kc = kptr_.get() + static_cast<std::size_t>(ln) * B, vc = vptr_.get() + static_cast<std::size_t>(ln) * B;
      } else {
        const LayerW<T>& N = layers_[static_cast<std::size_t>(ln)];
        N.qkv.device_ranges(w);
        N.o.device_ranges(w);
        if (N.moe) N.router.device_ranges(w);
      }
      FPF_CUDA(cudaEventRecord(fork_ev_, st));
      FPF_CUDA(cudaStreamWaitEvent(side_, fork_ev_));
      ops::prefetch_l2<T>(w, kc, vc, d_seq, d_pos, R, kv_dim, side_);
      side_used = true;
    };
    // The step's exchange with page-locked host memory: a kernel in a graph (ops::copy_words), else a copy.
    auto host_copy = [&](const void* src, void* dst, std::size_t words, cudaMemcpyKind kind) {
      if (as_graph) ops::copy_words(src, dst, words, st);
      else FPF_CUDA(cudaMemcpyAsync(dst, src, words * sizeof(std::int32_t), kind, st));
    };
    // Everything from the embedding to the top-k: in decode a fixed sequence of kernels (no host round trip).
    auto run = [&](int slot) {
    Slot& S = slot_[slot];
    d_ids = S.meta.get(), d_seq = d_ids + R, d_pos = d_seq + R, d_cap = d_pos + R, d_cap_of_row = d_cap + Nc;
    d_src = d_cap_of_row + R;
    d_stage = S.out.get(), d_top_lp = d_stage + n_stage, d_top = reinterpret_cast<std::int32_t*>(d_top_lp + n_lp);
    side_used = false;
    host_copy(S.meta_host.get(), S.meta.get(), n_meta, cudaMemcpyHostToDevice);
    ops::embed<T>(d_ids, d_src, reinterpret_cast<const std::int32_t*>(slot_[1 - slot].out.get()), R, embed_.get(), x_.get(),
                  H, static_cast<int>(V), st);
    for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
      LayerW<T>& L = layers_[static_cast<std::size_t>(l)];
      float* const tap_in = l > 0 ? tap_block_of(l) : nullptr;  // x is the hidden state after layer l (1-based)
      float* const tap_out = tap_block_of(l + 1);                // this layer's keys
      ops::rmsnorm<T>(x_.get(), nullptr, L.input_norm.get(), h_.get(), R, H, eps, st, {tap_in, d_cap_of_row});
      L.qkv.apply(gemm_, h_.get(), R, qkv_.get(), wscratch_.get(), st);
      timer_.mark("norm+qkv");
      T* const* kc = kptr_.get() + static_cast<std::size_t>(l) * B;
      T* const* vc = vptr_.get() + static_cast<std::size_t>(l) * B;
      ops::qk_norm_rope<T>(qkv_.get(), d_seq, d_pos, R, L.q_norm.get(), L.k_norm.get(), inv_freq_.get(), kc, vc, nh, nkv,
                           D, eps, st, {tap_out != nullptr ? tap_out + static_cast<std::size_t>(Nc) * H : nullptr, d_cap_of_row});
      attn::CudaArgs<T> a;
      a.q = qkv_.get();
      a.q_stride = static_cast<std::size_t>(qkv_dim);
      a.kcache = kc;
      a.vcache = vc;
      a.row_seq = d_seq;
      a.row_pos = d_pos;
      a.rows = R;
      a.num_heads = nh;
      a.num_kv_heads = nkv;
      a.head_dim = D;
      a.max_keys = max_keys;
      a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
      a.out = att_.get();
      if (decode) {  // split each row's keys over many blocks
        a.max_keys = kernel_keys;
        a.scratch = attn_scratch_.get();
      }
      timer_.mark("qknorm_rope");
      if (decode) {
        attn::Cuda<Attention>::template run<T>(a, st);
      } else {  // prefill: the policy's whole-sequence path (cuBLASLt for eager, tensor cores for flash)
        std::vector<attn::PrefillSeq<T>> segs;
        for (int b = 0; b < B; ++b)
          segs.push_back({first_row[b], static_cast<int>(chunks[static_cast<std::size_t>(b)].tokens.size()), p0[b],
                          seqs_[b].k[static_cast<std::size_t>(l)].get(), seqs_[b].v[static_cast<std::size_t>(l)].get()});
        attn::Cuda<Attention>::template run_prefill<T>(a, segs, {gemm_, prefill_s_, prefill_p_}, st);
      }
      timer_.mark("attention");
      L.o.apply(gemm_, att_.get(), R, tmp_.get(), wscratch_.get(), st);
      prefetch_next(l + 1, true);
      // Decode MoE: moe() adds, normalises and routes in one launch where it can (fused_router).
      const bool fused = decode && L.moe && fused_router(L, R);
      if (!fused) ops::add_rmsnorm<T>(x_.get(), tmp_.get(), L.post_norm.get(), h_.get(), R, H, eps, st);
      timer_.mark("o+norm");
      if (!L.moe) {
        L.gate_up.apply(gemm_, h_.get(), R, gu_.get(), wscratch_.get(), st);
        prefetch_next(l + 1, false);
        ops::swiglu<T>(gu_.get(), act_.get(), R, I, st);
        L.down.apply(gemm_, act_.get(), R, tmp_.get(), wscratch_.get(), st);
        ops::add<T>(x_.get(), tmp_.get(), static_cast<std::size_t>(R) * H, st);
      } else {
        moe(L, R, st, [&] { prefetch_next(l + 1, false); }, fused);
      }
      timer_.mark("mlp/moe");
    }
    // The final norm's block i reads capture i's row: the last layer's tap takes it as is.
    ops::rmsnorm<T>(x_.get(), d_cap, final_norm_.get(), hc_.get(), Nc, H, eps, st, {tap_block_of(cfg_.num_hidden_layers), nullptr});
    gemm_.linear<T>(hc_.get(), Nc, lm_head(), static_cast<int>(V), H, logits_.get(), st);
    std::int32_t* d_arg = d_top + static_cast<std::size_t>(Nc) * spec.topk;
    ops::log_softmax_topk<T>(logits_.get(), Nc, V, spec.topk, d_top, d_top_lp, d_arg, lsm_, st);
    if (side_used) {
      FPF_CUDA(cudaEventRecord(join_ev_, side_));
      FPF_CUDA(cudaStreamWaitEvent(st, join_ev_));
    }
    // The step's one read-back, into page-locked memory.
    host_copy(S.out.get(), S.out_host.get(), n_out, cudaMemcpyDeviceToHost);
    timer_.mark("taps+head");
    };

    if (adopt && moved) {  // not expected (the queued step had these sizes); never let it run on in moved buffers
      FPF_CUDA(cudaStreamSynchronize(stream_));
      adopt = false;
    }
    if (!adopt) std::copy(meta.begin(), meta.end(), slot_[si].meta_host.get());
    adopted_ += adopt ? 1 : 0;
    timer_.start();
    // A decode graph's key: the step's shape and taps, then the slot (its buffers).
    std::vector<long long> key{R, B, Nc, spec.topk, kernel_keys, static_cast<long long>(tapped.size())};
    key.insert(key.end(), tapped.begin(), tapped.end());
    key.push_back(si);
    // Captured graphs whose kernels point into a buffer that moved are dropped, whichever step moved it (a prefill,
    // which runs without a graph, grows the row buffers).
    if (moved) graphs_by_key_.clear();
    if (as_graph) {
      if (!adopt) {
        auto it = graphs_by_key_.find(key);
        if (it == graphs_by_key_.end()) {
          it = graphs_by_key_.emplace(key, capture([&] { run(si); })).first;
          if (pipeline_) {  // the other slot's graph too, for the step queued behind this one
            std::vector<long long> other = key;
            other.back() = 1 - si;
            if (graphs_by_key_.find(other) == graphs_by_key_.end()) graphs_by_key_.emplace(other, capture([&] { run(1 - si); }));
          }
        }
        step_clock_.mark(0, stream_);
        FPF_CUDA(cudaGraphLaunch(it->second.exec, stream_));
        step_clock_.mark(1, stream_);
        FPF_CUDA(cudaEventRecord(slot_[si].done, stream_));
      }
    } else {
      run(si);
      FPF_CUDA(cudaEventRecord(slot_[si].done, stream_));
    }
    last_slot_ = si;
    timer_.report(R);
    // Pipelining: where every sequence took one token, the greedy continuation (each sequence's argmax, fed back on
    // the device, one position on) is queued now as the next step, in the other slot, so the GPU has it while the
    // host reads this step back and the caller picks the next tokens. The next forward adopts it or drops it (above).
    // Only where its graph exists and no cache must grow for it.
    bool speculate = pipeline_ && as_graph && R == B && Nc == R;
    pending_.on = false;  // an adopted step is this one now
    for (int b = 0; speculate && b < B; ++b) speculate = seqs_[b].capacity >= p0[b] + 2;
    if (speculate) {
      std::vector<long long> next = key;
      next.back() = 1 - si;
      const auto it = graphs_by_key_.find(next);
      speculate = it != graphs_by_key_.end();
      if (speculate) {
        // Its rows: the same sequences and captures, one position on, each token word arg0 + capture of this step's
        // read-back (its argmax). Its slot's last step (two back) has finished: the slot is free.
        const std::size_t arg0 = n_stage + n_lp + static_cast<std::size_t>(Nc) * spec.topk;
        std::vector<std::int32_t> pos(row_pos), src(cap_of_row);
        for (std::int32_t& p : pos) ++p;
        for (std::int32_t& w : src) w += static_cast<std::int32_t>(arg0);
        const std::vector<std::int32_t> next_meta = pack_meta(std::vector<std::int32_t>(static_cast<std::size_t>(R), 0), pos, src);
        std::copy(next_meta.begin(), next_meta.end(), slot_[1 - si].meta_host.get());
        FPF_CUDA(cudaGraphLaunch(it->second.exec, stream_));
        FPF_CUDA(cudaEventRecord(slot_[1 - si].done, stream_));
        pending_.on = true;
        pending_.slot = 1 - si;
        pending_.spec = spec;
        pending_.len.assign(static_cast<std::size_t>(B), 0);
        for (int b = 0; b < B; ++b) pending_.len[static_cast<std::size_t>(b)] = p0[b] + 1;
        pending_.token.assign(static_cast<std::size_t>(B), -1);  // read back below
      }
    }
    // The output's maps and vectors are built, at their sizes, while the step runs: after the read-back only the
    // values are copied in. (Built after it, they took ~40 us of each ~2.3 ms decode step on the H100 machine's
    // host: docs/cuda.md, session 11.)
    std::vector<Captured> out(static_cast<std::size_t>(B));
    for (int b = 0; b < B; ++b) {
      const int Tn = static_cast<int>(chunks[static_cast<std::size_t>(b)].tokens.size());
      for (int t = c0[b]; t < Tn; ++t) {
        taps::PositionSignals& ps = out[static_cast<std::size_t>(b)][p0[b] + t];
        for (int layer : tapped) ps.hidden[layer].resize(static_cast<std::size_t>(H)), ps.keys[layer].resize(static_cast<std::size_t>(kv_dim));
        ps.logprobs.token_ids.resize(static_cast<std::size_t>(spec.topk));
        ps.logprobs.log_probs.resize(static_cast<std::size_t>(spec.topk));
      }
    }
    FPF_CUDA(cudaEventSynchronize(slot_[si].done));
    step_clock_.mark(2, stream_, false);
    const float* const stage = slot_[si].out_host.get();
    const float* const top_lp = stage + n_stage;
    std::vector<std::int32_t> top(n_top);  // the int32 words, copied out of the float buffer
    std::memcpy(top.data(), stage + n_stage + n_lp, n_top * sizeof(std::int32_t));
    int ci = 0;
    for (int b = 0; b < B; ++b) {
      const int Tn = static_cast<int>(chunks[static_cast<std::size_t>(b)].tokens.size());
      for (int t = c0[b]; t < Tn; ++t, ++ci) {
        taps::PositionSignals& ps = out[static_cast<std::size_t>(b)][p0[b] + t];
        int lj = 0;
        for (int layer : tapped) {
          const float* st = stage + static_cast<std::size_t>(lj++) * tap_block;
          std::copy_n(st + static_cast<std::size_t>(ci) * H, H, ps.hidden[layer].begin());
          const float* ks = st + static_cast<std::size_t>(Nc) * H;
          std::copy_n(ks + static_cast<std::size_t>(ci) * kv_dim, kv_dim, ps.keys[layer].begin());
        }
        std::copy_n(top.begin() + static_cast<std::ptrdiff_t>(ci) * spec.topk, spec.topk, ps.logprobs.token_ids.begin());
        std::copy_n(top_lp + static_cast<std::ptrdiff_t>(ci) * spec.topk, spec.topk, ps.logprobs.log_probs.begin());
        ps.argmax = top[static_cast<std::size_t>(Nc) * spec.topk + static_cast<std::size_t>(ci)];
        if (speculate) pending_.token[static_cast<std::size_t>(b)] = ps.argmax;  // one row per sequence
      }
      seqs_[b].len += Tn;
    }
    if (as_graph && !adopt) step_clock_.step(t_entry);
    return out;
  }

 private:
  struct Seq {
    std::vector<DeviceBuffer<T>> k, v;  // per layer: [capacity, kv_dim]
    int len = 0, capacity = 0;
  };

  // Waits for a speculative step still in flight (pipelining, forward) and drops it.
  void drain() {
    if (!pending_.on) return;
    FPF_CUDA(cudaStreamSynchronize(stream_));
    pending_.on = false;
  }

  const T* lm_head() const { return cfg_.tie_word_embeddings ? embed_.get() : lm_head_.get(); }

  // Grows a sequence's caches (keeping their contents) so that `need` positions fit.
  void ensure_capacity(Seq& s, int need) {
    if (need <= s.capacity && !s.k.empty()) return;
    const int cap = (need + 256 + 255) / 256 * 256;
    const std::size_t kv_dim = static_cast<std::size_t>(cfg_.num_key_value_heads) * cfg_.head_dim;
    const std::size_t L = static_cast<std::size_t>(cfg_.num_hidden_layers);
    s.k.resize(L);
    s.v.resize(L);
    for (std::size_t l = 0; l < L; ++l)
      for (DeviceBuffer<T>* buf : {&s.k[l], &s.v[l]}) {
        DeviceBuffer<T> grown(static_cast<std::size_t>(cap) * kv_dim);
        if (s.len > 0) FPF_CUDA(cudaMemcpy(grown.get(), buf->get(), static_cast<std::size_t>(s.len) * kv_dim * sizeof(T), cudaMemcpyDeviceToDevice));
        *buf = std::move(grown);
      }
    s.capacity = cap;
    tables_dirty_ = true;
  }

  // Returns whether the tables' own allocations moved.
  bool upload_cache_tables() {
    const std::size_t L = static_cast<std::size_t>(cfg_.num_hidden_layers), B = static_cast<std::size_t>(batch_);
    if (!tables_dirty_ && kptr_.size() >= L * B && table_batch_ == batch_) return false;
    std::vector<T*> kp(L * B), vp(L * B);
    for (std::size_t l = 0; l < L; ++l)
      for (std::size_t b = 0; b < B; ++b) kp[l * B + b] = seqs_[b].k[l].get(), vp[l * B + b] = seqs_[b].v[l].get();
    const bool moved = kptr_.resize(L * B) | vptr_.resize(L * B);
    kptr_.upload(kp.data(), kp.size());
    vptr_.upload(vp.data(), vp.size());
    tables_dirty_ = false;
    table_batch_ = batch_;
    return moved;
  }

  // Whether a decode step's MoE layer adds, normalises and routes in one launch (moe's `fused`; FPF_FUSED_ROUTER=0:
  // never): one row and a dense router that ops::add_rmsnorm_router takes (sm_90). One row only: each of the kernel's
  // blocks normalises the rows one after the other, and at two rows the step was slower than with the two launches
  // (H100, real shape: 3.42 against 3.29 ms/token; one row: 2.20 against 2.27).
  bool fused_router(const LayerW<T>& L, int R) const {
    const int H = cfg_.hidden_size, E = cfg_.num_experts, k = cfg_.num_experts_per_tok;
    return fused_router_ && R == 1 && !L.router.quantized() &&
           ops::add_rmsnorm_router_fits<T>(x_.get(), tmp_.get(), L.router.dense_matrix(0), R, E, H, k);
  }

  // The MoE block: x_ += experts(h_). after_gate_up: called once the decode path's gate_up product is launched.
  // fused (fused_router): x_ += o (tmp_) and h_ = post_norm(x_) are still to do: one launch adds, normalises and
  // routes (ops::add_rmsnorm_router: the values of add_rmsnorm and router_gemv, one launch fewer; docs/cuda.md,
  // session 13).
  template <class AfterGateUp>
  void moe(LayerW<T>& L, int R, cudaStream_t st, AfterGateUp&& after_gate_up, bool fused = false) {
    const int H = cfg_.hidden_size, E = cfg_.num_experts, k = cfg_.num_experts_per_tok, I = cfg_.moe_intermediate_size;
    const int P = R * k;
    std::int32_t* d_ids = route_ids_.get();
    if (fused) {
      ops::add_rmsnorm_router<T>(x_.get(), tmp_.get(), L.post_norm.get(), h_.get(), R, H, static_cast<float>(cfg_.rms_norm_eps),
                                 L.router.dense_matrix(0), E, rlogits_.get(), k, cfg_.norm_topk_prob, d_ids, route_wts_.get(), st);
    } else if (!L.router.quantized() && ops::router_gemv_fits<T>(h_.get(), L.router.dense_matrix(0), R, E, H, k)) {
      ops::router_gemv<T>(h_.get(), R, L.router.dense_matrix(0), E, H, rlogits_.get(), k, cfg_.norm_topk_prob, d_ids,
                          route_wts_.get(), router_count_.get(), st);
    } else {
      L.router.apply(gemm_, h_.get(), R, rlogits_.get(), wscratch_.get(), st);
      ops::router<T>(rlogits_.get(), R, E, k, cfg_.norm_topk_prob, d_ids, route_wts_.get(), st);
    }
    timer_.mark("moe router");
    if (R <= ops::kGemvMaxRows) {
      // 4-bit weights: gate_up with the SwiGLU, and down with the combine, one kernel each (same bits as apart);
      // dense weights: moe_gemv, swiglu, moe_gemv, moe_combine.
      L.gate_up.moe_gemv_swiglu(h_.get(), k, d_ids, P, gu_.get(), act_.get(), st);
      after_gate_up();
      L.down.moe_gemv_combine(act_.get(), d_ids, route_wts_.get(), R, k, ye_.get(), x_.get(), H, st);
      return;
    }
    // Group the slots by expert on the device (ops::route_group: a stable counting sort, ascending expert then
    // ascending slot). bf16/fp16: all experts in one grouped product per projection that reads the offsets on the
    // device (no host round trip). fp32: the rows padded to the largest count when that at most doubles them, and
    // cuBLASLt (strided-batched, or one product per expert), for which the host reads back the offsets.
    std::int32_t* d_rows = d_ids + P;             // grouped row -> slot (-1: padding), up to 2 P rows
    std::int32_t* d_slot_row = d_rows + 2 * P;    // slot -> grouped row
    std::int32_t* d_info = d_slot_row + P;        // offsets [E + 1], Mmax, padded
    constexpr bool grouped = Linear<T>::kGrouped;
    ops::route_group(d_ids, P, E, d_rows, d_slot_row, d_info, !grouped, st);
    if constexpr (grouped) {
      ops::gather<T>(h_.get(), d_rows, k, P, xg_.get(), H, st);
      timer_.mark("moe group");
      T* scratch = moe_scratch(L);
      L.gate_up.experts_grouped(xg_.get(), d_info, P, gu_.get(), scratch, st);
      timer_.mark("moe gate_up");
      ops::swiglu<T>(gu_.get(), act_.get(), P, I, st);
      L.down.experts_grouped(act_.get(), d_info, P, ye_.get(), scratch, st);
      timer_.mark("moe down");
      ops::moe_combine<T>(x_.get(), ye_.get(), d_slot_row, route_wts_.get(), R, k, H, st);
      return;
    }
    std::vector<std::int32_t> info(static_cast<std::size_t>(E) + 3);
    FPF_CUDA(cudaMemcpy(info.data(), d_info, info.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost));
    const std::vector<int> count(info.begin(), info.begin() + E + 1);  // offsets
    const int Mmax = info[static_cast<std::size_t>(E) + 1];
    const bool batched = info[static_cast<std::size_t>(E) + 2] != 0;
    const int G = batched ? E * Mmax : P;  // grouped rows
    const bool grew = xg_.resize(static_cast<std::size_t>(G) * H) | gu_.resize(static_cast<std::size_t>(G) * 2 * I) |
           act_.resize(static_cast<std::size_t>(G) * I) | ye_.resize(static_cast<std::size_t>(G) * H);
    if (grew) graphs_by_key_.clear();  // captured decode steps point into the old buffers
    ops::gather<T>(h_.get(), d_rows, k, G, xg_.get(), H, st);
    timer_.mark("moe group");
    if (batched) {
      T* scratch = moe_scratch(L);
      L.gate_up.experts_batched(gemm_, xg_.get(), Mmax, gu_.get(), scratch, st);
      timer_.mark("moe gate_up");
      ops::swiglu<T>(gu_.get(), act_.get(), G, I, st);
      L.down.experts_batched(gemm_, act_.get(), Mmax, ye_.get(), scratch, st);
      timer_.mark("moe down");
    } else {
      for (int e = 0; e < E; ++e) {
        const int n = count[e + 1] - count[e];
        const std::size_t off = static_cast<std::size_t>(count[e]);
        L.gate_up.expert(gemm_, e, xg_.get() + off * H, n, gu_.get() + off * 2 * I, wscratch_.get(), st);
      }
      timer_.mark("moe gate_up");
      ops::swiglu<T>(gu_.get(), act_.get(), P, I, st);
      for (int e = 0; e < E; ++e) {
        const int n = count[e + 1] - count[e];
        const std::size_t off = static_cast<std::size_t>(count[e]);
        L.down.expert(gemm_, e, act_.get() + off * I, n, ye_.get() + off * H, wscratch_.get(), st);
      }
      timer_.mark("moe down");
    }
    ops::moe_combine<T>(x_.get(), ye_.get(), d_slot_row, route_wts_.get(), R, k, H, st);
  }

  // Scratch for a layer's 4-bit experts dequantized all at once (grown on first use: decode graphs pointing into the
  // old buffer are dropped).
  T* moe_scratch(const LayerW<T>& L) {
    if (wscratch_.resize(std::max(L.gate_up.batched_scratch_elems(), L.down.batched_scratch_elems()))) graphs_by_key_.clear();
    return wscratch_.get();
  }

  void load(const io::Checkpoint& ckpt, const QuantFns& qf) {
    model::WeightReader r(ckpt, cfg_);
    Uploader up;
    const std::int64_t H = cfg_.hidden_size, V = cfg_.vocab_size, D = cfg_.head_dim;
    const std::int64_t nq = std::int64_t{cfg_.num_attention_heads} * D, nkv = std::int64_t{cfg_.num_key_value_heads} * D;
    auto whole = [&](auto& buf, const std::string& name, std::vector<std::int64_t> shape) {
      const io::TensorInfo& t = r.tensor(name, shape);
      using E = std::remove_pointer_t<decltype(buf.get())>;
      buf.resize(static_cast<std::size_t>(t.numel()));
      up.template operator()<E>(t, 0, static_cast<std::size_t>(t.numel()), buf.get());
    };
    // A dense Linear's weight [out, in] into dst.
    auto linear_into = [&](T* dst, const std::string& module, std::int64_t out, std::int64_t in) {
      const io::TensorInfo& t = r.tensor(module + ".weight", {out, in});
      up.template operator()<T>(t, 0, static_cast<std::size_t>(out * in), dst);
    };
    std::size_t scratch = 0;
    const auto t_load = std::chrono::steady_clock::now();
    double pack_s = 0, upload_s = 0;  // 4-bit modules: repacking (worker threads), device upload
    // Modules sharing one input: modules[e][j] is part j (rows outs[j], concatenated in order) of matrix e. Dense
    // (T) or 4-bit packed as the policy finds them; the packers of all parts run on worker threads.
    auto load_linear = [&](Linear<T>& lin, const std::vector<std::vector<std::string>>& modules,
                           const std::vector<std::int64_t>& outs, std::int64_t in) {
      const std::size_t E = modules.size(), J = outs.size();
      std::int64_t N = 0;
      for (std::int64_t o : outs) N += o;
      lin.set_shape(static_cast<int>(E), static_cast<int>(N), static_cast<int>(in));
      const bool quantized = qf.quantized(r, modules[0][0]);
      for (const auto& row : modules)
        for (const std::string& m : row)
          if (qf.quantized(r, m) != quantized)
            throw Error(ckpt.dir().string() + ": " + m, std::string("stored ") + (quantized ? "dense" : "quantized") +
                                                           " while " + modules[0][0] + " is not: the CUDA backend fuses "
                                                           "these modules' rows and needs them stored alike");
      if (!quantized) {
        lin.dense().resize(E * static_cast<std::size_t>(N * in));
        for (std::size_t e = 0; e < E; ++e) {
          std::int64_t row0 = 0;
          for (std::size_t j = 0; j < J; ++j) {
            linear_into(lin.dense().get() + (static_cast<std::int64_t>(e) * N + row0) * in, modules[e][j], outs[j], in);
            row0 += outs[j];
          }
        }
        return;
      }
      std::vector<quant::Packer> packers;
      for (std::size_t j = 0; j < J; ++j)
        for (std::size_t e = 0; e < E; ++e) packers.push_back(qf.packer(r, modules[e][j], outs[j], in));
      const auto t0 = std::chrono::steady_clock::now();
      std::vector<quant::Packed4> packed = run_packers(packers);
      std::vector<std::vector<quant::Packed4>> parts(J);
      for (std::size_t j = 0; j < J; ++j)
        for (std::size_t e = 0; e < E; ++e) parts[j].push_back(std::move(packed[j * E + e]));
      const auto t1 = std::chrono::steady_clock::now();
      upload_packed(lin, parts, up.parallel());
      pack_s += std::chrono::duration<double>(t1 - t0).count();
      upload_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
      scratch = std::max(scratch, lin.scratch_elems());
    };
    whole(embed_, "model.embed_tokens.weight", {V, H});
    whole(final_norm_, "model.norm.weight", {H});
    std::set<std::string> ignorable{"model.rotary_emb.inv_freq"};
    if (cfg_.tie_word_embeddings) {
      ignorable.insert("lm_head.weight");
    } else {
      if (qf.quantized(r, "lm_head"))
        throw Error(ckpt.dir().string() + ": lm_head", "stored quantized: the CUDA backend reads a dense lm_head only");
      lm_head_.resize(static_cast<std::size_t>(V * H));
      linear_into(lm_head_.get(), "lm_head", V, H);
    }
    layers_.resize(static_cast<std::size_t>(cfg_.num_hidden_layers));
    for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
      LayerW<T>& L = layers_[static_cast<std::size_t>(l)];
      const std::string p = model::layer_prefix(l);
      whole(L.input_norm, p + ".input_layernorm.weight", {H});
      whole(L.post_norm, p + ".post_attention_layernorm.weight", {H});
      whole(L.q_norm, p + ".self_attn.q_norm.weight", {D});
      whole(L.k_norm, p + ".self_attn.k_norm.weight", {D});
      const std::string a = p + ".self_attn.";
      load_linear(L.qkv, {{a + "q_proj", a + "k_proj", a + "v_proj"}}, {nq, nkv, nkv}, H);
      load_linear(L.o, {{a + "o_proj"}}, {H}, nq);
      L.moe = cfg_.is_moe_layer(l);
      if (!L.moe) {
        const std::int64_t I = cfg_.intermediate_size;
        const std::string m = p + ".mlp.";
        load_linear(L.gate_up, {{m + "gate_proj", m + "up_proj"}}, {I, I}, H);
        load_linear(L.down, {{m + "down_proj"}}, {H}, I);
        continue;
      }
      const std::int64_t E = cfg_.num_experts, I = cfg_.moe_intermediate_size;
      load_linear(L.router, {{p + ".mlp.gate"}}, {E}, H);
      const std::string fused_gu = p + ".mlp.experts.gate_up_proj", fused_down = p + ".mlp.experts.down_proj";
      if (r.has(fused_gu) && !r.has(p + ".mlp.experts.0.gate_proj.weight") && !r.has(p + ".mlp.experts.0.gate_proj.qweight")) {
        L.gate_up.set_shape(static_cast<int>(E), static_cast<int>(2 * I), static_cast<int>(H));
        L.down.set_shape(static_cast<int>(E), static_cast<int>(H), static_cast<int>(I));
        L.gate_up.dense().resize(static_cast<std::size_t>(E * 2 * I * H));
        L.down.dense().resize(static_cast<std::size_t>(E * H * I));
        const io::TensorInfo& gu = r.tensor(fused_gu, {E, 2 * I, H});
        up.template operator()<T>(gu, 0, static_cast<std::size_t>(E * 2 * I * H), L.gate_up.dense().get());
        const io::TensorInfo& dn = r.tensor(fused_down, {E, H, I});
        up.template operator()<T>(dn, 0, static_cast<std::size_t>(E * H * I), L.down.dense().get());
      } else {
        std::vector<std::vector<std::string>> gu(static_cast<std::size_t>(E)), dn(static_cast<std::size_t>(E));
        for (std::int64_t e = 0; e < E; ++e) {
          const std::string x = p + ".mlp.experts." + std::to_string(e);
          gu[static_cast<std::size_t>(e)] = {x + ".gate_proj", x + ".up_proj"};
          dn[static_cast<std::size_t>(e)] = {x + ".down_proj"};
        }
        load_linear(L.gate_up, gu, {I, I}, H);
        load_linear(L.down, dn, {H}, I);
      }
    }
    r.check_all_used(ignorable);
    wscratch_.resize(scratch + 1);
    FPF_CUDA(cudaDeviceSynchronize());
    if (timer_.on())
      std::fprintf(stderr, "[fpf cuda profile] load %.2f s: 4-bit repacking %.2f s, 4-bit upload %.2f s\n",
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count(), pack_s, upload_s);
  }

  struct Graph {
    cudaGraph_t graph{};
    cudaGraphExec_t exec{};
  };
  // Captures one decode step's kernels (run() on stream_) as a CUDA graph.
  template <class Run>
  Graph capture(Run&& run) {
    Graph g;
    FPF_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
    try {
      run();
    } catch (...) {
      cudaGraph_t broken{};
      cudaStreamEndCapture(stream_, &broken);
      if (broken) cudaGraphDestroy(broken);
      throw;
    }
    FPF_CUDA(cudaStreamEndCapture(stream_, &g.graph));
    FPF_CUDA(cudaGraphInstantiate(&g.exec, g.graph, 0));
    return g;
  }
  struct Graphs {
    std::map<std::vector<long long>, Graph> m;
    auto find(const std::vector<long long>& k) { return m.find(k); }
    auto end() { return m.end(); }
    auto emplace(const std::vector<long long>& k, Graph g) { return m.emplace(k, g); }
    void clear() {
      for (auto& [k, g] : m) {
        cudaGraphExecDestroy(g.exec);
        cudaGraphDestroy(g.graph);
      }
      m.clear();
    }
    ~Graphs() { clear(); }
  };

  // FPF_STEP_TIMES=1: where a graph-replayed decode step's wall time goes, printed to stderr when the model is
  // destroyed (medians over the steps, us). Host clock: from forward's entry to the graph launch (the step's rows
  // and metadata, the graph lookup), the launch call, the wait for the stream (the output's maps are built before
  // it), and from there to forward's return (the values copied into the maps). Events on the step's stream: the
  // graph, from its metadata upload to its read-back. Off by default (no events recorded, no clock read).
  struct StepClock {
    bool on = std::getenv("FPF_STEP_TIMES") != nullptr && std::string(std::getenv("FPF_STEP_TIMES")) != "0";
    cudaEvent_t ev[2]{};
    std::chrono::steady_clock::time_point host[3];
    std::vector<double> part[6];
    StepClock() {
      if (on)
        for (cudaEvent_t& e : ev) FPF_CUDA(cudaEventCreate(&e));
    }
    ~StepClock() {
      if (!on) return;
      if (!part[5].empty()) {
        auto med = [](std::vector<double> v) {
          std::sort(v.begin(), v.end());
          return v[v.size() / 2];
        };
        std::fprintf(stderr,
                     "[fpf step times] %zu decode steps, medians (us). host: to launch %.1f, launch %.1f, wait %.1f, "
                     "output %.1f; stream: graph %.1f; wall %.1f\n",
                     part[5].size(), med(part[0]), med(part[1]), med(part[2]), med(part[3]), med(part[4]), med(part[5]));
      }
      for (cudaEvent_t e : ev) cudaEventDestroy(e);
    }
    // Host mark i: 0 before the launch, 1 after it (both with an event), 2 after the stream's synchronisation.
    void mark(int i, cudaStream_t s, bool event = true) {
      if (!on) return;
      host[i] = std::chrono::steady_clock::now();
      if (event) FPF_CUDA(cudaEventRecord(ev[i], s));
    }
    void step(std::chrono::steady_clock::time_point entry) {
      if (!on) return;
      const auto end = std::chrono::steady_clock::now();
      auto us = [](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count(); };
      part[0].push_back(us(entry, host[0]));
      part[1].push_back(us(host[0], host[1]));
      part[2].push_back(us(host[1], host[2]));
      part[3].push_back(us(host[2], end));
      float ms = 0;
      FPF_CUDA(cudaEventElapsedTime(&ms, ev[0], ev[1]));
      part[4].push_back(1e3 * ms);
      part[5].push_back(us(entry, end));
    }
  };

  io::ModelConfig cfg_;
  StageTimer timer_;
  StepClock step_clock_;
  // Decode steps run as CUDA graphs (FPF_CUDA_GRAPHS=0: launched one by one; same kernels, same values).
  bool graphs_ = std::getenv("FPF_CUDA_GRAPHS") == nullptr || std::string(std::getenv("FPF_CUDA_GRAPHS")) != "0";
  // Decode steps are pipelined (forward; FPF_CUDA_PIPELINE=0: each step is launched when asked for). Off while
  // FPF_STEP_TIMES times each step's own launch and wait.
  bool pipeline_ = (std::getenv("FPF_CUDA_PIPELINE") == nullptr || std::string(std::getenv("FPF_CUDA_PIPELINE")) != "0") &&
                   !step_clock_.on;
  cudaStream_t stream_ = make_stream();
  // Decode MoE layers add, normalise and route in one launch where they can (fused_router; FPF_FUSED_ROUTER=0: never).
  bool fused_router_ = std::getenv("FPF_FUSED_ROUTER") == nullptr || std::string(std::getenv("FPF_FUSED_ROUTER")) != "0";
  // The decode step's L2 prefetch (sm_90; FPF_L2_PREFETCH=0 turns it off): a side stream and its fork / join events.
  bool l2_prefetch_ = ops::prefetch_l2_available() &&
                      (std::getenv("FPF_L2_PREFETCH") == nullptr || std::string(std::getenv("FPF_L2_PREFETCH")) != "0");
  cudaStream_t side_ = make_stream(cudaStreamNonBlocking);
  cudaEvent_t fork_ev_ = make_event(), join_ev_ = make_event();
  Graphs graphs_by_key_;
  Gemm gemm_;
  DeviceBuffer<T> embed_, lm_head_;
  DeviceBuffer<float> final_norm_, inv_freq_;
  std::vector<LayerW<T>> layers_;
  std::vector<Seq> seqs_;
  int batch_ = 0, table_batch_ = -1;
  bool tables_dirty_ = true;
  DeviceBuffer<T*> kptr_, vptr_;
  DeviceBuffer<std::int32_t> route_ids_;
  // A step's metadata (meta, uploaded from meta_host) and its read-back (out, copied to out_host; see forward), in two
  // slots that consecutive steps take in turn, so that a step can be queued behind another without touching what
  // that one reads or writes (pipelining). Both slots always have the same sizes.
  struct Slot {
    DeviceBuffer<std::int32_t> meta;
    HostBuffer<std::int32_t> meta_host;
    DeviceBuffer<float> out;
    HostBuffer<float> out_host;
    cudaEvent_t done = make_event();  // recorded behind the step's read-back
    Slot() = default;
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    ~Slot() {
      if (done) cudaEventDestroy(done);
    }
  };
  Slot slot_[2];
  int last_slot_ = 1;  // the slot of the step launched last
  // The step queued behind the last one (pipelining, forward): its slot, and what the next forward must ask for to
  // adopt it (each sequence's one token and length, the same taps).
  struct Pending {
    bool on = false;
    int slot = 0;
    std::vector<int> len;
    std::vector<std::int32_t> token;
    taps::TapSpec spec;
  };
  Pending pending_;
  std::size_t adopted_ = 0;  // steps adopted from the pipeline
  DeviceBuffer<unsigned> router_count_;  // ops::router_gemv's last-block counter
  ops::LsmScratch lsm_;                   // ops::log_softmax_topk's scratch
  DeviceBuffer<float> route_wts_, attn_scratch_, prefill_s_;
  DeviceBuffer<T> prefill_p_;
  DeviceBuffer<T> x_, h_, tmp_, qkv_, att_, gu_, act_, ye_, xg_, rlogits_, hc_, logits_;
  DeviceBuffer<T> wscratch_;  // a packed matrix dequantized for the prefill product
};

}  // namespace detail

template <class S>
class Backend::Model {
  using Attention = typename S::attention;

 public:
  Model(const io::Checkpoint& ckpt, const io::ModelConfig& cfg, const EngineOptions& opts) : cfg_(cfg) {
    device_ = require_device();
    const detail::QuantFns qf = detail::quant_fns<typename S::quant>();
    switch (opts.precision) {
      case Precision::fp32: impl_ = std::make_unique<detail::Impl<Attention, float>>(ckpt, cfg, qf); break;
      case Precision::bf16: impl_ = std::make_unique<detail::Impl<Attention, bf16>>(ckpt, cfg, qf); break;
      case Precision::fp16: impl_ = std::make_unique<detail::Impl<Attention, fp16>>(ckpt, cfg, qf); break;
    }
  }

  const io::ModelConfig& config() const { return cfg_; }
  const std::string& device() const { return device_; }

  void reset(int batch) {
    std::visit([&](auto& m) { m->reset(batch); }, impl_);
  }
  std::vector<Captured> forward(std::span<const Chunk> chunks, const taps::TapSpec& spec) {
    return std::visit([&](auto& m) { return m->forward(chunks, spec); }, impl_);
  }
  // Decode steps that were already running when forward asked for them (pipelining; FPF_CUDA_PIPELINE=0: none).
  std::size_t adopted_steps() const {
    return std::visit([](const auto& m) { return m->adopted_steps(); }, impl_);
  }

 private:
  io::ModelConfig cfg_;
  std::string device_;
  std::variant<std::unique_ptr<detail::Impl<Attention, float>>, std::unique_ptr<detail::Impl<Attention, bf16>>,
               std::unique_ptr<detail::Impl<Attention, fp16>>>
      impl_;
};

}  // namespace fpf::cuda
