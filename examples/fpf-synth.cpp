// fpf-synth: writes a synthetic Qwen3 / Qwen3-MoE checkpoint directory in the exact Hugging Face layout (config.json
// as the published model ships it, sharded safetensors with per-expert tensor names, model.safetensors.index.json,
// generation_config.json, and the tokenizer files of data/qwen3-tokenizer/ when present), with seeded random
// weights. The same arguments always write the same bytes.
//
//   fpf-synth --shape qwen3-30b-a3b|tiny-moe|tiny-dense --out DIR [--seed 0] [--dtype bf16|fp16|fp32]
//             [--layers N] [--max-shard-gb 4] [--tokenizer DIR] [--force]
//             [--quant awq|gptq|gptq-actorder|nf4 [--group-size G] [--threads N]]
//   fpf-synth --from DENSE_DIR --quant awq|gptq|gptq-actorder|nf4 --out DIR [--group-size G] [--threads N]
//             [--max-shard-gb 4] [--force]
//
// --quant writes the checkpoint quantized as the published AWQ / GPTQ / bitsandbytes-NF4 checkpoints store it
// (docs/quantization.md: quant/rewrite.hpp, the tool's quantization_config in config.json): with --shape the dense
// weights are synthesized in memory and only the quantized checkpoint is written; with --from an existing dense
// checkpoint is quantized. --group-size (AWQ/GPTQ) must divide every quantized Linear's in_features; by default 128
// (that of the published Qwen3 checkpoints), or, where 128 does not divide them (the tiny shapes), the largest
// divisor of all in_features below 128, said on stderr. Linears are quantized on --threads workers (0 = all
// cores) in batches written shard by shard, so the real shape's ~19,400 Linears never hold more than a shard and a
// batch of output (plus the pools below); progress goes to stderr when there are 1000 Linears or more. The bytes
// do not depend on --threads.
//
// Scaling (so activations stay finite and informative through 48 blocks): every Linear weight is N(0, 1/in)
// (unit-variance outputs for unit-rms inputs, which RMSNorm guarantees before every block), embeddings N(0, 1),
// norm weights 1 + N(0, 0.05^2). The residual stream then grows like sqrt(layers), a few units after 48 blocks.
//
// Memory: a real-shape bf16 checkpoint is 57 GiB. Weights are drawn from a few seeded pools of random values (one
// per scale, each a little larger than its largest tensor), and each tensor is a window of its pool at a seeded
// offset, so the writer holds ~1.5 GiB, not 57, while every tensor (every expert) still gets its own values.
// Write the real shape to /dev/shm (RAM-backed) on the GPU machine.
//
// Exit codes: 0 written; 2 bad arguments (unknown shape or scheme, missing --out, non-empty --out without --force,
// --from without config.json or already quantized, a group size that does not divide in_features, ...).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>
#include <fpf/io/safetensors.hpp>
#include <fpf/quant/config.hpp>
#include <fpf/quant/rewrite.hpp>

#include "common/cli.hpp"

#ifndef FPF_SOURCE_DIR
#define FPF_SOURCE_DIR "."
#endif

namespace fs = std::filesystem;

namespace {

struct Shape {
  std::string model_type;  // qwen3_moe | qwen3
  int hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, moe_intermediate = 0, experts = 0,
      top_k = 0, max_pos = 40960;
  std::int64_t vocab = 0;
  double rope_theta = 1e6;
  bool tie = false, norm_topk = true;
};

Shape named_shape(const std::string& name) {
  if (name == "qwen3-30b-a3b")  // Qwen/Qwen3-30B-A3B config.json
    return {"qwen3_moe", 2048, 48, 32, 4, 128, 6144, 768, 128, 8, 40960, 151936, 1e6, false, true};
  if (name == "tiny-moe") return {"qwen3_moe", 64, 4, 4, 2, 16, 128, 32, 8, 2, 4096, 512, 1e6, false, true};
  if (name == "tiny-dense") return {"qwen3", 64, 3, 4, 2, 16, 128, 0, 0, 0, 4096, 512, 1e6, true, false};
  throw fpf::Error("--shape", "unknown shape '" + name + "' (qwen3-30b-a3b, tiny-moe or tiny-dense)");
}

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// n values of mean + sd * N(0, 1), as dtype bytes; generated in 1M-element chunks with their own seeds (Box-Muller),
// in parallel, so the values do not depend on the thread count.
std::vector<std::byte> pool(std::size_t n, double mean, double sd, fpf::DType dtype, std::uint64_t seed) {
  const std::size_t es = fpf::dtype_size(dtype);
  std::vector<std::byte> out(n * es);
  constexpr std::size_t kChunk = 1 << 20;
  const std::size_t chunks = (n + kChunk - 1) / kChunk;
  const unsigned threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool_threads;
  for (unsigned t = 0; t < threads; ++t)
    pool_threads.emplace_back([&, t] {
      for (std::size_t c = t; c < chunks; c += threads) {
        std::uint64_t s = seed * 0x100000001b3ull + c;
        const std::size_t end = std::min(n, (c + 1) * kChunk);
        for (std::size_t i = c * kChunk; i < end; i += 2) {
          const double u1 = (static_cast<double>(splitmix(s) >> 11) + 1.0) * 0x1.0p-53;
          const double u2 = static_cast<double>(splitmix(s) >> 11) * 0x1.0p-53;
          const double r = std::sqrt(-2.0 * std::log(u1));
          const double z[2] = {r * std::cos(2 * M_PI * u2), r * std::sin(2 * M_PI * u2)};
          for (std::size_t j = 0; j < 2 && i + j < end; ++j) {
            const float v = static_cast<float>(mean + sd * z[j]);
            std::byte* dst = out.data() + (i + j) * es;
            if (dtype == fpf::DType::BF16) {
              const std::uint16_t h = fpf::f32_to_bf16(v);
              std::memcpy(dst, &h, 2);
            } else if (dtype == fpf::DType::F16) {
              const std::uint16_t h = fpf::f32_to_f16(v);
              std::memcpy(dst, &h, 2);
            } else {
              std::memcpy(dst, &v, 4);
            }
          }
        }
      }
    });
  for (auto& th : pool_threads) th.join();
  return out;
}

// quant: the serialized quantization_config object, empty for a dense checkpoint (keys stay in alphabetical order).
std::string config_json(const Shape& s, const std::string& dtype_name, const std::string& quant = {}) {
  std::string j = "{\n  \"architectures\": [\n    \"" + std::string(s.model_type == "qwen3_moe" ? "Qwen3MoeForCausalLM" : "Qwen3ForCausalLM") +
                  "\"\n  ],\n";
  auto kv = [&](const std::string& k, const std::string& v) { j += "  \"" + k + "\": " + v + ",\n"; };
  const std::string b = s.tie ? "true" : "false";
  kv("attention_bias", "false");
  kv("attention_dropout", "0.0");
  kv("bos_token_id", "151643");
  if (s.model_type == "qwen3_moe") kv("decoder_sparse_step", "1");
  kv("eos_token_id", "151645");
  kv("head_dim", std::to_string(s.head_dim));
  kv("hidden_act", "\"silu\"");
  kv("hidden_size", std::to_string(s.hidden));
  kv("initializer_range", "0.02");
  kv("intermediate_size", std::to_string(s.intermediate));
  kv("max_position_embeddings", std::to_string(s.max_pos));
  kv("max_window_layers", std::to_string(s.layers));
  if (s.model_type == "qwen3_moe") kv("mlp_only_layers", "[]");
  kv("model_type", "\"" + s.model_type + "\"");
  if (s.model_type == "qwen3_moe") {
    kv("moe_intermediate_size", std::to_string(s.moe_intermediate));
    kv("norm_topk_prob", s.norm_topk ? "true" : "false");
  }
  kv("num_attention_heads", std::to_string(s.heads));
  if (s.model_type == "qwen3_moe") {
    kv("num_experts", std::to_string(s.experts));
    kv("num_experts_per_tok", std::to_string(s.top_k));
  }
  kv("num_hidden_layers", std::to_string(s.layers));
  kv("num_key_value_heads", std::to_string(s.kv_heads));
  if (s.model_type == "qwen3_moe") kv("output_router_logits", "false");
  if (!quant.empty()) kv("quantization_config", quant);
  kv("rms_norm_eps", "1e-06");
  kv("rope_scaling", "null");
  char theta[32];
  std::snprintf(theta, sizeof theta, "%.1f", s.rope_theta);
  kv("rope_theta", theta);
  if (s.model_type == "qwen3_moe") kv("router_aux_loss_coef", "0.001");
  kv("sliding_window", "null");
  kv("tie_word_embeddings", b);
  kv("torch_dtype", "\"" + dtype_name + "\"");
  kv("transformers_version", "\"4.51.0\"");
  kv("use_cache", "true");
  kv("use_sliding_window", "false");
  j += "  \"vocab_size\": " + std::to_string(s.vocab) + "\n}\n";
  return j;
}

// --quant's options: the scheme, the group size checked against (or chosen for) every quantized Linear.
fpf::quant::QuantizeOptions quant_options(const std::string& scheme, std::optional<std::int64_t> group_size,
                                          unsigned threads, double max_shard_gb,
                                          const std::vector<fpf::io::TensorToWrite>& dense) {
  const auto parsed = fpf::quant::parse_scheme(scheme);
  if (!parsed) throw fpf::Error("--quant", "unknown scheme '" + scheme + "' (awq, gptq, gptq-actorder or nf4)");
  fpf::quant::QuantizeOptions o;
  o.scheme = *parsed;
  o.threads = threads;
  o.max_shard_bytes = static_cast<std::size_t>(max_shard_gb * 1e9);
  if (o.scheme == fpf::quant::Scheme::Nf4) {
    if (group_size) throw fpf::Error("--group-size", "not used by nf4 (bitsandbytes' blocks are 64 weights)");
    return o;
  }
  const auto linears = fpf::quant::quantized_linears(dense, o);
  o.group_size = fpf::quant::resolve_group_size(linears, group_size, "--group-size");
  if (!group_size && o.group_size != 128) {
    std::int64_t k = 0;  // the in_features that 128 does not divide, for the note
    std::string module;
    for (const auto& [m, K] : linears)
      if (K % 128 != 0) {
        k = K, module = m;
        break;
      }
    std::fprintf(stderr, "fpf-synth: group size %lld (128 does not divide in_features %lld of %s)\n",
                 static_cast<long long>(o.group_size), static_cast<long long>(k), module.c_str());
  }
  return o;
}

// Progress on stderr for a model with many Linears (the real shape: ~430 batches), a line per 5%; small ones stay
// quiet.
std::function<void(std::size_t, std::size_t)> progress_printer() {
  const auto t0 = std::chrono::steady_clock::now();
  return [t0, shown = std::size_t{0}](std::size_t done, std::size_t total) mutable {
    if (total < 1000 || (done * 20 / total == shown && done != total)) return;
    shown = done * 20 / total;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "fpf-synth: quantized %zu/%zu Linears (%.0f%%), %.0f s\n", done, total,
                 100.0 * static_cast<double>(done) / static_cast<double>(total), s);
  };
}

void copy_tokenizer_files(const fs::path& from, const fs::path& to, int& copied) {
  std::error_code ec;
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}) {
    const fs::path src = from / f;
    if (fs::exists(src, ec)) fs::copy_file(src, to / f, fs::copy_options::overwrite_existing), ++copied;
  }
}

void prepare_out(const std::string& out, bool force) {
  std::error_code ec;
  if (fs::exists(out, ec) && !fs::is_directory(out, ec)) throw fpf::Error("--out", out + " exists and is not a directory");
  if (fs::is_directory(out, ec) && !fs::is_empty(out, ec) && !force)
    throw fpf::Error("--out", out + " is not empty (use --force to write into it)");
  fs::create_directories(out, ec);
  if (ec) throw fpf::Error("--out", "cannot create " + out + ": " + ec.message());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fpf-synth: a seeded random checkpoint in the Hugging Face layout"};
  std::string shape_name, out, dtype_text = "bf16", tokenizer = std::string(FPF_SOURCE_DIR) + "/data/qwen3-tokenizer";
  std::string quant_text, from;
  std::uint64_t seed = 0;
  int layers = 0;
  std::int64_t group_size_arg = 128;
  unsigned threads = 0;
  double max_shard_gb = 4.0;
  bool force = false;
  app.add_option("--shape", shape_name, "qwen3-30b-a3b | tiny-moe | tiny-dense");
  app.add_option("--from", from, "dense checkpoint directory to quantize (with --quant) instead of synthesizing");
  app.add_option("--out", out, "checkpoint directory to write")->required();
  app.add_option("--quant", quant_text, "write it quantized: awq | gptq | gptq-actorder | nf4");
  auto* group_opt = app.add_option("--group-size", group_size_arg,
                                   "AWQ/GPTQ group size, -1 = one group (default 128, or the largest divisor of "
                                   "every in_features below 128 where 128 does not divide them)");
  app.add_option("--threads", threads, "quantization threads (0 = all cores); the bytes do not depend on it");
  app.add_option("--seed", seed, "random seed");
  app.add_option("--dtype", dtype_text, "bf16 | fp16 | fp32");
  app.add_option("--layers", layers, "override num_hidden_layers (a shorter model of the same width)");
  app.add_option("--max-shard-gb", max_shard_gb, "shard size limit in GB (default 4)");
  app.add_option("--tokenizer", tokenizer, "directory whose tokenizer files are copied (skipped when absent)");
  app.add_flag("--force", force, "write into a non-empty --out");
  if (auto code = fpf::examples::parse(app, "fpf-synth", argc, argv)) return *code;
  return fpf::run_main("fpf-synth", [&] {
    if (!(max_shard_gb > 0.0)) throw fpf::Error("--max-shard-gb", "must be positive");
    const std::optional<std::int64_t> group_size =
        group_opt->count() ? std::optional<std::int64_t>(group_size_arg) : std::nullopt;
    if (!from.empty()) {  // quantize an existing dense checkpoint
      if (!shape_name.empty()) throw fpf::Error("--from", "takes no --shape (the checkpoint is the shape)");
      if (quant_text.empty()) throw fpf::Error("--from", "needs --quant (fpf-synth does not copy dense checkpoints)");
      const fs::path cfg_file = fs::path(from) / "config.json";
      std::error_code ec;
      if (!fs::is_regular_file(cfg_file, ec))
        throw fpf::Error(cfg_file.string(), "missing: --from needs a Hugging Face checkpoint directory");
      if (fs::exists(out, ec) && fs::equivalent(from, out, ec))
        throw fpf::Error("--out", "must differ from --from (" + from + ")");
      const fpf::io::Checkpoint ckpt = fpf::io::Checkpoint::open(from);
      std::vector<fpf::io::TensorToWrite> dense;
      for (const std::string& name : ckpt.names()) {
        const fpf::io::TensorInfo& t = ckpt.get(name);
        dense.push_back({t.name, t.dtype, t.shape, t.bytes});
      }
      if (fpf::quant::policy_name(fpf::quant::load_quant_config(from)) != "dense")
        throw fpf::Error(cfg_file.string() + ": quantization_config", "present: --from needs a dense checkpoint");
      const fpf::quant::QuantizeOptions o = quant_options(quant_text, group_size, threads, max_shard_gb, dense);
      prepare_out(out, force);
      fpf::quant::quantize_checkpoint(from, out, o, progress_printer());
      std::printf("fpf-synth: %s quantized (%s) -> %s\n", from.c_str(), quant_text.c_str(), out.c_str());
      return fpf::kExitOk;
    }
    if (shape_name.empty()) throw fpf::Error("--shape", "required (or --from DIR with --quant)");
    if (quant_text.empty() && (group_opt->count() || threads))
      throw fpf::Error(group_opt->count() ? "--group-size" : "--threads", "only applies with --quant");
    if (!quant_text.empty() && !fpf::quant::parse_scheme(quant_text))
      throw fpf::Error("--quant", "unknown scheme '" + quant_text + "' (awq, gptq, gptq-actorder or nf4)");
    Shape s = named_shape(shape_name);
    if (layers < 0 || layers > 1000) throw fpf::Error("--layers", "must be in 1..1000 (0 = the shape's own)");
    if (layers > 0) s.layers = layers;
    fpf::DType dtype;
    std::string torch_dtype;
    if (dtype_text == "bf16") dtype = fpf::DType::BF16, torch_dtype = "bfloat16";
    else if (dtype_text == "fp16") dtype = fpf::DType::F16, torch_dtype = "float16";
    else if (dtype_text == "fp32") dtype = fpf::DType::F32, torch_dtype = "float32";
    else throw fpf::Error("--dtype", "unknown dtype '" + dtype_text + "' (bf16, fp16 or fp32)");

    const std::int64_t H = s.hidden, D = s.head_dim, V = s.vocab, I = s.intermediate, Ie = s.moe_intermediate;
    const std::int64_t nq = std::int64_t{s.heads} * D, nkv = std::int64_t{s.kv_heads} * D;
    const bool moe = s.model_type == "qwen3_moe";

    // Every tensor: name, shape, pool (by fan-in; 0 = embedding, -1 = norm).
    struct Spec {
      std::string name;
      std::vector<std::int64_t> shape;
      std::int64_t pool;
    };
    std::vector<Spec> specs;
    specs.push_back({"model.embed_tokens.weight", {V, H}, 0});
    for (int l = 0; l < s.layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l);
      specs.push_back({p + ".input_layernorm.weight", {H}, -1});
      if (moe) {
        for (int e = 0; e < s.experts; ++e) {
          const std::string x = p + ".mlp.experts." + std::to_string(e);
          specs.push_back({x + ".down_proj.weight", {H, Ie}, Ie});
          specs.push_back({x + ".gate_proj.weight", {Ie, H}, H});
          specs.push_back({x + ".up_proj.weight", {Ie, H}, H});
        }
        specs.push_back({p + ".mlp.gate.weight", {s.experts, H}, H});
      } else {
        specs.push_back({p + ".mlp.down_proj.weight", {H, I}, I});
        specs.push_back({p + ".mlp.gate_proj.weight", {I, H}, H});
        specs.push_back({p + ".mlp.up_proj.weight", {I, H}, H});
      }
      specs.push_back({p + ".post_attention_layernorm.weight", {H}, -1});
      specs.push_back({p + ".self_attn.k_norm.weight", {D}, -1});
      specs.push_back({p + ".self_attn.k_proj.weight", {nkv, H}, H});
      specs.push_back({p + ".self_attn.o_proj.weight", {H, nq}, nq});
      specs.push_back({p + ".self_attn.q_norm.weight", {D}, -1});
      specs.push_back({p + ".self_attn.q_proj.weight", {nq, H}, H});
      specs.push_back({p + ".self_attn.v_proj.weight", {nkv, H}, H});
    }
    specs.push_back({"model.norm.weight", {H}, -1});
    if (!s.tie) specs.push_back({"lm_head.weight", {V, H}, H});

    // Checked before anything is made or written (the real shape's pools take a while): a group size that does not
    // fit is a usage error, not a half-written directory. Planning reads only names and shapes.
    std::optional<fpf::quant::QuantizeOptions> qo;
    if (!quant_text.empty()) {
      std::vector<fpf::io::TensorToWrite> shapes;
      for (const Spec& t : specs) shapes.push_back({t.name, dtype, t.shape, {}});
      qo = quant_options(quant_text, group_size, threads, max_shard_gb, shapes);
    }
    prepare_out(out, force);

    // Pools: each a little larger than its largest tensor, so windows at different offsets differ.
    std::map<std::int64_t, std::size_t> largest;
    for (const Spec& t : specs) {
      std::size_t n = 1;
      for (auto d : t.shape) n *= static_cast<std::size_t>(d);
      largest[t.pool] = std::max(largest[t.pool], n);
    }
    const std::size_t es = fpf::dtype_size(dtype);
    std::map<std::int64_t, std::vector<std::byte>> pools;
    for (const auto& [key, n] : largest) {
      const std::size_t size = n + std::max<std::size_t>(n / 16, 4096);
      const double mean = key == -1 ? 1.0 : 0.0, sd = key == -1 ? 0.05 : key == 0 ? 1.0 : 1.0 / std::sqrt(static_cast<double>(key));
      pools[key] = pool(size, mean, sd, dtype, seed * 1000003ull + static_cast<std::uint64_t>(key + 7));
    }
    std::vector<fpf::io::TensorToWrite> tensors;
    std::uint64_t rng = seed ^ 0x5eedull;
    for (const Spec& t : specs) {
      std::size_t n = 1;
      for (auto d : t.shape) n *= static_cast<std::size_t>(d);
      const std::vector<std::byte>& p = pools[t.pool];
      const std::size_t room = p.size() / es - n;
      const std::size_t off = room ? splitmix(rng) % (room + 1) : 0;
      tensors.push_back({t.name, dtype, t.shape, std::span<const std::byte>(p.data() + off * es, n * es)});
    }
    std::string quant_config;
    std::size_t written = 0, total = 0;
    if (!qo) {
      fpf::io::write_sharded_checkpoint(out, tensors, static_cast<std::size_t>(max_shard_gb * 1e9));
      written = tensors.size();
      for (const auto& t : tensors) total += t.bytes.size();
    } else {
      fpf::io::ShardedCheckpointWriter writer(out, qo->max_shard_bytes);
      const std::vector<std::string> skip = fpf::quant::quantize_tensors_streamed(
          tensors, dtype, s.tie, *qo,
          [&](auto&& batch) {
            for (const fpf::io::TensorToWrite& t : batch.tensors()) writer.add(t), ++written, total += t.bytes.size();
          },
          progress_printer());
      writer.finish();
      quant_config = boost::json::serialize(fpf::quant::quantization_config_json(*qo, dtype, skip));
    }

    std::ofstream(fs::path(out) / "config.json") << config_json(s, torch_dtype, quant_config);
    std::ofstream(fs::path(out) / "generation_config.json")
        << "{\n  \"bos_token_id\": 151643,\n  \"do_sample\": false,\n  \"eos_token_id\": 151645,\n  \"transformers_version\": \"4.51.0\"\n}\n";
    int copied = 0;
    copy_tokenizer_files(tokenizer, out, copied);
    std::printf("fpf-synth: %s (%d layers, %s%s%s) -> %s: %zu tensors, %.2f GB, %d tokenizer files\n", shape_name.c_str(),
                s.layers, dtype_text.c_str(), qo ? ", " : "", quant_text.c_str(), out.c_str(), written,
                static_cast<double>(total) / 1e9, copied);
    return fpf::kExitOk;
  });
}
