#pragma once
// Qwen3 / Qwen3-MoE weights in fp32 for the CPU reference, bound by tensor name from a Hugging Face checkpoint
// (formats.md §1.3). Experts may be stored per expert (`mlp.experts.E.gate_proj.weight`, what transformers saves)
// or fused (`mlp.experts.gate_up_proj` [E, 2I, H] with gate rows first, `mlp.experts.down_proj` [E, H, I], the
// in-memory layout of transformers 5). Linear weights (the router and lm_head included) come through the Quant
// policy, which reads a module stored unquantized as dense; norms and embeddings are always dense.
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <fpf/io/config.hpp>
#include <fpf/io/safetensors.hpp>
#include <fpf/model/weights.hpp>

namespace fpf::model {

struct LinearF32 {
  std::vector<float> w;  // [out, in] row-major
  std::int64_t out = 0, in = 0;
};

struct MlpF32 {  // SwiGLU: down(silu(gate x) * up x)
  LinearF32 gate, up, down;
};

struct LayerF32 {
  std::vector<float> input_norm, post_attention_norm, q_norm, k_norm;
  LinearF32 q, k, v, o;
  bool moe = false;
  MlpF32 mlp;                  // dense layers
  LinearF32 router;            // MoE layers: [num_experts, hidden]
  std::vector<MlpF32> experts; // MoE layers
};

struct WeightsF32 {
  std::vector<float> embed;    // [vocab, hidden]
  std::vector<LayerF32> layers;
  std::vector<float> norm;     // final RMSNorm
  std::vector<float> lm_head;  // [vocab, hidden]; empty when tied to embed
  const std::vector<float>& head() const { return lm_head.empty() ? embed : lm_head; }
};

inline std::string layer_prefix(int l) { return "model.layers." + std::to_string(l); }

// Reads the fused expert tensors' slice for expert e: rows [row0, row0 + rows) of a [E, R, C] tensor.
inline LinearF32 fused_slice(WeightReader& r, const std::string& name, std::int64_t e, std::int64_t E,
                             std::int64_t R, std::int64_t row0, std::int64_t rows, std::int64_t C) {
  const io::TensorInfo& t = r.tensor(name, {E, R, C});
  LinearF32 lin{WeightReader::widen(t, static_cast<std::size_t>((e * R + row0) * C), static_cast<std::size_t>(rows * C)),
                rows, C};
  return lin;
}

template <class Quant>
WeightsF32 load_weights_f32(const io::Checkpoint& ckpt, const io::ModelConfig& cfg) {
  WeightReader r(ckpt, cfg);
  const std::int64_t H = cfg.hidden_size, V = cfg.vocab_size, D = cfg.head_dim;
  const std::int64_t nq = cfg.num_attention_heads * D, nkv = cfg.num_key_value_heads * D;
  auto linear = [&](const std::string& module, std::int64_t out, std::int64_t in) {
    return LinearF32{Quant::linear_f32(r, module, out, in), out, in};
  };

  WeightsF32 w;
  w.embed = r.f32("model.embed_tokens.weight", {V, H});
  w.norm = r.f32("model.norm.weight", {H});
  std::set<std::string> ignorable{"model.rotary_emb.inv_freq"};  // old checkpoints carry RoPE's buffer
  if (cfg.tie_word_embeddings)
    ignorable.insert("lm_head.weight");  // some tied checkpoints still store a copy; transformers ignores it
  else
    w.lm_head = Quant::linear_f32(r, "lm_head", V, H);

  w.layers.resize(static_cast<std::size_t>(cfg.num_hidden_layers));
  for (int l = 0; l < cfg.num_hidden_layers; ++l) {
    LayerF32& L = w.layers[static_cast<std::size_t>(l)];
    const std::string p = layer_prefix(l);
    L.input_norm = r.f32(p + ".input_layernorm.weight", {H});
    L.post_attention_norm = r.f32(p + ".post_attention_layernorm.weight", {H});
    L.q_norm = r.f32(p + ".self_attn.q_norm.weight", {D});
    L.k_norm = r.f32(p + ".self_attn.k_norm.weight", {D});
    L.q = linear(p + ".self_attn.q_proj", nq, H);
    L.k = linear(p + ".self_attn.k_proj", nkv, H);
    L.v = linear(p + ".self_attn.v_proj", nkv, H);
    L.o = linear(p + ".self_attn.o_proj", H, nq);
    L.moe = cfg.is_moe_layer(l);
    if (!L.moe) {
      const std::int64_t I = cfg.intermediate_size;
      L.mlp = {linear(p + ".mlp.gate_proj", I, H), linear(p + ".mlp.up_proj", I, H), linear(p + ".mlp.down_proj", H, I)};
      continue;
    }
    const std::int64_t E = cfg.num_experts, I = cfg.moe_intermediate_size;
    // The router goes through the Quant policy too: AWQ/GPTQ keep it dense (the policies then read it through
    // quant::Dense), but bitsandbytes quantizes every nn.Linear that its skip list leaves (formats.md §4.4).
    L.router = linear(p + ".mlp.gate", E, H);
    L.experts.resize(static_cast<std::size_t>(E));
    const std::string fused_gate_up = p + ".mlp.experts.gate_up_proj", fused_down = p + ".mlp.experts.down_proj";
    const bool fused = r.has(fused_gate_up) && !Quant::stores(r, p + ".mlp.experts.0.gate_proj");
    for (std::int64_t e = 0; e < E; ++e) {
      MlpF32& X = L.experts[static_cast<std::size_t>(e)];
      if (fused) {
        X.gate = fused_slice(r, fused_gate_up, e, E, 2 * I, 0, I, H);
        X.up = fused_slice(r, fused_gate_up, e, E, 2 * I, I, I, H);
        X.down = fused_slice(r, fused_down, e, E, H, 0, H, I);
      } else {
        const std::string x = p + ".mlp.experts." + std::to_string(e);
        X = {linear(x + ".gate_proj", I, H), linear(x + ".up_proj", I, H), linear(x + ".down_proj", H, I)};
      }
    }
  }
  r.check_all_used(ignorable);
  return w;
}

}  // namespace fpf::model
