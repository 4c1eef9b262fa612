#pragma once
// cpu::Backend: the fp32 reference backend (canonical; runs in CI). Weights are widened to fp32 at load; every op
// accumulates in fp32 in a fixed order (backend/cpu/ops.hpp). Each sequence of a batch is processed on its own
// with the same code path, so in this backend a sequence's signals are identical whatever its batch neighbours.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fpf/backend/cpu/ops.hpp>
#include <fpf/backend/interface.hpp>
#include <fpf/core/error.hpp>
#include <fpf/engine/options.hpp>
#include <fpf/io/config.hpp>
#include <fpf/io/safetensors.hpp>
#include <fpf/model/qwen3.hpp>
#include <fpf/model/rope.hpp>
#include <fpf/taps/capture.hpp>

namespace fpf {

namespace cpu {

struct Backend {
  static constexpr std::string_view name = "cpu";
  template <class S>
  class Model;
};

template <class S>
class Backend::Model {
  using Attention = typename S::attention;
  using Quant = typename S::quant;

 public:
  Model(const io::Checkpoint& ckpt, const io::ModelConfig& cfg, const EngineOptions& opts)
      : cfg_(cfg), w_(model::load_weights_f32<Quant>(ckpt, cfg)), inv_freq_(model::rope_inv_freq(cfg.rope_theta, cfg.head_dim)) {
    if (opts.precision != Precision::fp32)
      throw Error("--precision", "the cpu backend computes in fp32 only (got " + std::string(precision_name(opts.precision)) + ")");
  }

  const io::ModelConfig& config() const { return cfg_; }

  // Starts `batch` empty sequences (drops all KV caches).
  void reset(int batch) {
    seqs_.assign(static_cast<std::size_t>(batch), Seq{});
    for (Seq& s : seqs_) s.k.resize(w_.layers.size()), s.v.resize(w_.layers.size());
  }

  // Feeds chunks[b] to sequence b (appending to its KV cache) and returns the signals of each sequence's captured
  // positions: the tapped layers' hidden states and keys, and the top-k logprobs.
  std::vector<Captured> forward(std::span<const Chunk> chunks, const taps::TapSpec& spec) {
    if (chunks.size() != seqs_.size()) throw Error("forward", "batch size changed without reset()");
    std::vector<Captured> out(chunks.size());
    for (std::size_t b = 0; b < chunks.size(); ++b) forward_one(seqs_[b], chunks[b], spec, out[b]);
    return out;
  }

 private:
  struct Seq {
    std::vector<std::vector<float>> k, v;  // per layer: [len, kv_heads * head_dim], keys after k_norm + RoPE
    int len = 0;
  };

  void forward_one(Seq& seq, const Chunk& chunk, const taps::TapSpec& spec, Captured& cap) {
    const std::size_t T = chunk.tokens.size(), H = cfg_.hidden_size, D = cfg_.head_dim;
    const std::size_t nh = cfg_.num_attention_heads, nkv = cfg_.num_key_value_heads;
    const std::size_t q_dim = nh * D, kv_dim = nkv * D;
    const float eps = static_cast<float>(cfg_.rms_norm_eps);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    const int p0 = seq.len;
    const std::size_t c0 = static_cast<std::size_t>(std::clamp(chunk.capture_from - p0, 0, static_cast<int>(T) - 1));
    const std::set<int> tapped(spec.layers.begin(), spec.layers.end());

    std::vector<float> x(T * H), h(T * H), q(T * q_dim), k(T * kv_dim), v(T * kv_dim), att(T * q_dim), tmp(H);
    for (std::size_t t = 0; t < T; ++t) {
      const std::int32_t id = chunk.tokens[t];
      if (id < 0 || id >= cfg_.vocab_size)
        throw Error("prompt", "token id " + std::to_string(id) + " is outside the vocabulary (vocab_size " +
                                  std::to_string(cfg_.vocab_size) + ")");
      std::copy_n(w_.embed.data() + static_cast<std::size_t>(id) * H, H, x.data() + t * H);
    }

    for (std::size_t l = 0; l < w_.layers.size(); ++l) {
      const model::LayerF32& L = w_.layers[l];
      // --- attention ---
      for (std::size_t t = 0; t < T; ++t) {
        rmsnorm(x.data() + t * H, L.input_norm.data(), h.data() + t * H, H, eps);
        matvec(L.q.w.data(), h.data() + t * H, q.data() + t * q_dim, q_dim, H);
        matvec(L.k.w.data(), h.data() + t * H, k.data() + t * kv_dim, kv_dim, H);
        matvec(L.v.w.data(), h.data() + t * H, v.data() + t * kv_dim, kv_dim, H);
        for (std::size_t hd = 0; hd < nh; ++hd) {
          float* qh = q.data() + t * q_dim + hd * D;
          rmsnorm(qh, L.q_norm.data(), qh, D, eps);
          model::apply_rope(qh, inv_freq_, p0 + static_cast<std::int64_t>(t));
        }
        for (std::size_t hd = 0; hd < nkv; ++hd) {
          float* kh = k.data() + t * kv_dim + hd * D;
          rmsnorm(kh, L.k_norm.data(), kh, D, eps);
          model::apply_rope(kh, inv_freq_, p0 + static_cast<std::int64_t>(t));
        }
      }
      std::vector<float>& kc = seq.k[l];
      std::vector<float>& vc = seq.v[l];
      kc.insert(kc.end(), k.begin(), k.end());
      vc.insert(vc.end(), v.begin(), v.end());
      for (std::size_t t = 0; t < T; ++t) {
        Attention::cpu(attn::CpuArgs{q.data() + t * q_dim, kc.data(), vc.data(), p0 + static_cast<int>(t) + 1,
                                     static_cast<int>(nh), static_cast<int>(nkv), static_cast<int>(D), scale,
                                     att.data() + t * q_dim});
        matvec(L.o.w.data(), att.data() + t * q_dim, tmp.data(), H, q_dim);
        for (std::size_t i = 0; i < H; ++i) x[t * H + i] += tmp[i];
      }
      // --- MLP / MoE ---
      for (std::size_t t = 0; t < T; ++t) {
        rmsnorm(x.data() + t * H, L.post_attention_norm.data(), h.data() + t * H, H, eps);
        if (L.moe)
          moe(L, h.data() + t * H, tmp.data());
        else
          swiglu(L.mlp, h.data() + t * H, tmp.data());
        for (std::size_t i = 0; i < H; ++i) x[t * H + i] += tmp[i];
      }
      // --- taps: the residual after block l+1, and the keys as cached ---
      const int layer1 = static_cast<int>(l) + 1;
      if (tapped.count(layer1))
        for (std::size_t t = c0; t < T; ++t) {
          taps::PositionSignals& ps = cap[p0 + static_cast<int>(t)];
          ps.hidden[layer1].assign(x.begin() + static_cast<std::ptrdiff_t>(t * H), x.begin() + static_cast<std::ptrdiff_t>((t + 1) * H));
          ps.keys[layer1].assign(k.begin() + static_cast<std::ptrdiff_t>(t * kv_dim), k.begin() + static_cast<std::ptrdiff_t>((t + 1) * kv_dim));
        }
    }

    // --- final norm, lm_head and logprobs for the captured positions ---
    std::vector<float> logits(static_cast<std::size_t>(cfg_.vocab_size));
    for (std::size_t t = c0; t < T; ++t) {
      rmsnorm(x.data() + t * H, w_.norm.data(), h.data(), H, eps);
      matvec(w_.head().data(), h.data(), logits.data(), logits.size(), H);
      taps::set_logits(cap[p0 + static_cast<int>(t)], logits, spec.topk);
    }
    seq.len += static_cast<int>(T);
  }

  // down(silu(gate x) * up x)
  void swiglu(const model::MlpF32& m, const float* x, float* y) const {
    const std::size_t I = static_cast<std::size_t>(m.gate.out), H = static_cast<std::size_t>(m.gate.in);
    std::vector<float> g(I), u(I);
    matvec(m.gate.w.data(), x, g.data(), I, H);
    matvec(m.up.w.data(), x, u.data(), I, H);
    for (std::size_t i = 0; i < I; ++i) g[i] = silu(g[i]) * u[i];
    matvec(m.down.w.data(), g.data(), y, H, I);
  }

  // Router softmax over all experts in fp32, top-k (ties to the lower expert id), optional renormalisation, then
  // the selected experts' outputs weighted and summed in ascending expert order (transformers' index_add_ order).
  void moe(const model::LayerF32& L, const float* x, float* y) const {
    const std::size_t E = static_cast<std::size_t>(L.router.out), H = static_cast<std::size_t>(L.router.in);
    std::vector<float> p(E), ye(H);
    matvec(L.router.w.data(), x, p.data(), E, H);
    softmax(p.data(), E);
    std::vector<std::int32_t> top = topk_indices(p, static_cast<std::size_t>(cfg_.num_experts_per_tok));
    std::vector<float> wt(top.size());
    float sum = 0.0f;
    for (std::size_t i = 0; i < top.size(); ++i) sum += (wt[i] = p[static_cast<std::size_t>(top[i])]);
    if (cfg_.norm_topk_prob)
      for (float& v : wt) v /= sum;
    std::vector<std::size_t> order(top.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return top[a] < top[b]; });
    std::fill(y, y + H, 0.0f);
    for (std::size_t i : order) {
      swiglu(L.experts[static_cast<std::size_t>(top[i])], x, ye.data());
      for (std::size_t j = 0; j < H; ++j) y[j] += ye[j] * wt[i];
    }
  }

  io::ModelConfig cfg_;
  model::WeightsF32 w_;
  std::vector<float> inv_freq_;
  std::vector<Seq> seqs_;
};

}  // namespace cpu
}  // namespace fpf
