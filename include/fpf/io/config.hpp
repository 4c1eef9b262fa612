#pragma once
// config.json of Qwen3 ("qwen3") and Qwen3-MoE ("qwen3_moe") models, in the spellings of transformers 4.x and 5.x.
// docs/formats.md section 1. Defaults follow transformers' Qwen3Config / Qwen3MoeConfig where a key is optional;
// keys that fix tensor shapes are required (transformers always writes them, and a silent default of a 30B model's
// size would only surface later as a confusing shape mismatch).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>

#include <fpf/core/error.hpp>
#include <fpf/io/json_util.hpp>

namespace fpf::io {

struct ModelConfig {
  std::filesystem::path file;
  std::string model_type;  // "qwen3" | "qwen3_moe"
  int hidden_size = 0, num_hidden_layers = 0, num_attention_heads = 0, num_key_value_heads = 0;
  int head_dim = 0;                   // absent: hidden_size / num_attention_heads (qwen3_moe); 128 (qwen3, HF default)
  int intermediate_size = 0;          // dense MLP width (0 if absent and no layer is dense)
  int moe_intermediate_size = 0;      // 0 for dense models
  int num_experts = 0;                // "num_experts" or "num_local_experts"; 0 = dense
  int num_experts_per_tok = 0;
  bool norm_topk_prob = false;        // HF default for qwen3_moe when the key is absent
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;   // 0-based layer indices
  std::int64_t vocab_size = 0;
  double rope_theta = 10000.0;        // "rope_theta" or rope_parameters.rope_theta (or rope_scaling.rope_theta)
  std::string rope_type = "default";  // only "default" is supported
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  std::string dtype = "float32";      // "torch_dtype" or "dtype": "bfloat16" | "float16" | "float32"
  std::int64_t max_position_embeddings = 32768;  // HF default when absent

  // layer0 is 0-based. The rule of Qwen3MoeDecoderLayer (and vLLM): sparse iff not in mlp_only_layers, experts
  // exist, and (layer0 + 1) is a multiple of decoder_sparse_step.
  bool is_moe_layer(int layer0) const {
    return num_experts > 0 &&
           std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer0) == mlp_only_layers.end() &&
           (layer0 + 1) % decoder_sparse_step == 0;
  }
  bool is_moe() const { return num_experts > 0; }
};

namespace detail {

// Typed access to the top-level object; every error names the file and the key.
class ConfigReader {
 public:
  ConfigReader(const boost::json::object& o, std::string file) : o_(o), file_(std::move(file)) {}

  std::string where(std::string_view key) const { return file_ + ": " + std::string(key); }

  // nullptr when absent or JSON null (transformers treats an explicit null like the default).
  const boost::json::value* get(std::string_view key) const {
    const boost::json::value* v = o_.if_contains(boost::json::string_view(key.data(), key.size()));
    return (v == nullptr || v->is_null()) ? nullptr : v;
  }
  bool is_explicit_null(std::string_view key) const {
    const boost::json::value* v = o_.if_contains(boost::json::string_view(key.data(), key.size()));
    return v != nullptr && v->is_null();
  }
  const boost::json::value& need(std::string_view key) const {
    const boost::json::value* v = get(key);
    if (v == nullptr) throw Error(where(key), "missing (required)");
    return *v;
  }

  static std::optional<std::int64_t> as_int(const boost::json::value& v) {
    if (v.is_int64()) return v.get_int64();
    if (v.is_uint64() && v.get_uint64() <= static_cast<std::uint64_t>(INT64_MAX))
      return static_cast<std::int64_t>(v.get_uint64());
    return std::nullopt;
  }

  std::int64_t to_int64(std::string_view key, const boost::json::value& v, std::int64_t min,
                        std::int64_t max = INT64_MAX) const {
    const std::optional<std::int64_t> i = as_int(v);
    if (!i) throw Error(where(key), "must be an integer, got " + json::brief(v));
    if (*i < min || *i > max)
      throw Error(where(key), "must be " + (max == INT64_MAX ? ">= " + std::to_string(min)
                                                              : "in [" + std::to_string(min) + ", " + std::to_string(max) + "]") +
                                  ", got " + std::to_string(*i));
    return *i;
  }
  int to_int(std::string_view key, const boost::json::value& v, int min) const {
    return static_cast<int>(to_int64(key, v, min, INT_MAX));
  }
  int required_int(std::string_view key, int min) const { return to_int(key, need(key), min); }
  int optional_int(std::string_view key, int dflt, int min) const {
    const boost::json::value* v = get(key);
    return v ? to_int(key, *v, min) : dflt;
  }

  double to_positive_number(std::string_view key, const boost::json::value& v) const {
    double d = 0;
    if (v.is_double()) d = v.get_double();
    else if (const auto i = as_int(v)) d = static_cast<double>(*i);
    else throw Error(where(key), "must be a number, got " + json::brief(v));
    if (!(d > 0) || !std::isfinite(d)) throw Error(where(key), "must be a positive finite number, got " + json::brief(v));
    return d;
  }

  bool optional_bool(std::string_view key, bool dflt) const {
    const boost::json::value* v = get(key);
    if (v == nullptr) return dflt;
    if (!v->is_bool()) throw Error(where(key), "must be true or false, got " + json::brief(*v));
    return v->get_bool();
  }

  std::optional<std::string> optional_string(std::string_view key) const {
    const boost::json::value* v = get(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_string()) throw Error(where(key), "must be a string, got " + json::brief(*v));
    return std::string(v->get_string());
  }

  // One of two spellings of the same setting (transformers 4.x vs 5.x). Both present and different: an error,
  // since which one transformers would use depends on its version.
  const boost::json::value* either(std::string_view a, std::string_view b, std::string_view* used) const {
    const boost::json::value* va = get(a);
    const boost::json::value* vb = get(b);
    if (va && vb && *va != *vb)
      throw Error(where(a), "disagrees with " + std::string(b) + " (" + json::brief(*va) + " vs " + json::brief(*vb) + ")");
    *used = va ? a : b;
    return va ? va : vb;
  }

 private:
  const boost::json::object& o_;
  std::string file_;
};

}  // namespace detail

// Parses config.json text; file_for_errors is named in every error ("<file>: <key>: <what>").
inline ModelConfig parse_config(std::string_view json_text, const std::filesystem::path& file_for_errors) {
  const std::string file = file_for_errors.string();
  const boost::json::value root = json::parse(json_text, file);
  if (!root.is_object()) throw Error(file, "must be a JSON object, got " + json::kind_name(root));
  const detail::ConfigReader r(root.get_object(), file);

  ModelConfig c;
  c.file = file_for_errors;
  {
    const std::optional<std::string> mt = r.optional_string("model_type");
    if (!mt) throw Error(r.where("model_type"), "missing (required)");
    if (*mt != "qwen3" && *mt != "qwen3_moe")
      throw Error(r.where("model_type"), "'" + *mt + "' is not supported (fpf loads qwen3 and qwen3_moe)");
    c.model_type = *mt;
  }
  const bool moe_type = c.model_type == "qwen3_moe";

  c.hidden_size = r.required_int("hidden_size", 1);
  c.num_hidden_layers = r.required_int("num_hidden_layers", 1);
  c.num_attention_heads = r.required_int("num_attention_heads", 1);
  // null means "same as num_attention_heads" in transformers (plain multi-head attention).
  c.num_key_value_heads = r.is_explicit_null("num_key_value_heads") ? c.num_attention_heads
                                                                    : r.required_int("num_key_value_heads", 1);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw Error(r.where("num_key_value_heads"), std::to_string(c.num_key_value_heads) +
                                                    " does not divide num_attention_heads (" +
                                                    std::to_string(c.num_attention_heads) + ")");
  if (r.get("head_dim")) {
    c.head_dim = r.required_int("head_dim", 1);
  } else if (moe_type) {  // Qwen3MoeAttention: getattr(config, "head_dim", hidden_size // num_attention_heads)
    if (c.hidden_size % c.num_attention_heads != 0)
      throw Error(r.where("head_dim"), "absent, and hidden_size (" + std::to_string(c.hidden_size) +
                                           ") is not a multiple of num_attention_heads (" +
                                           std::to_string(c.num_attention_heads) + ")");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  } else {
    c.head_dim = 128;  // Qwen3Config's class default, used by transformers when the key is absent
  }
  c.vocab_size = r.to_int64("vocab_size", r.need("vocab_size"), 1);

  // MoE keys count only for qwen3_moe: Qwen3ForCausalLM ignores them.
  if (moe_type) {
    std::string_view key;
    const boost::json::value* ne = r.either("num_experts", "num_local_experts", &key);
    if (ne == nullptr) throw Error(r.where("num_experts"), "missing (required for qwen3_moe; or num_local_experts)");
    c.num_experts = r.to_int(key, *ne, 0);
    c.decoder_sparse_step = r.optional_int("decoder_sparse_step", 1, 1);
    c.norm_topk_prob = r.optional_bool("norm_topk_prob", false);
    if (const boost::json::value* v = r.get("mlp_only_layers")) {
      if (!v->is_array()) throw Error(r.where("mlp_only_layers"), "must be an array of layer indices, got " + json::brief(*v));
      for (const boost::json::value& e : v->get_array())
        c.mlp_only_layers.push_back(static_cast<int>(r.to_int64("mlp_only_layers", e, 0, c.num_hidden_layers - 1)));
    }
    if (c.num_experts > 0) {
      c.num_experts_per_tok = r.required_int("num_experts_per_tok", 1);
      if (c.num_experts_per_tok > c.num_experts)
        throw Error(r.where("num_experts_per_tok"), std::to_string(c.num_experts_per_tok) + " exceeds num_experts (" +
                                                        std::to_string(c.num_experts) + ")");
      c.moe_intermediate_size = r.required_int("moe_intermediate_size", 1);
    }
  }
  bool any_dense = false;
  for (int l = 0; l < c.num_hidden_layers && !any_dense; ++l) any_dense = !c.is_moe_layer(l);
  c.intermediate_size = any_dense ? r.required_int("intermediate_size", 1) : r.optional_int("intermediate_size", 0, 1);

  // RoPE. 5.x: rope_parameters {rope_type, rope_theta}; 4.x: top-level rope_theta plus rope_scaling (null, or a
  // dict whose type is "rope_type" or the older "type"). Only the default (unscaled) RoPE is implemented.
  const boost::json::object* rope_params = nullptr;
  const boost::json::object* rope_scaling = nullptr;
  for (std::string_view dict_key : {"rope_parameters", "rope_scaling"}) {
    const boost::json::value* d = r.get(dict_key);
    if (d == nullptr) continue;
    if (!d->is_object()) throw Error(r.where(dict_key), "must be an object or null, got " + json::brief(*d));
    const boost::json::object& o = d->get_object();
    for (const auto& kv : o)  // 5.x form for models mixing attention types: one dict per layer type
      if (kv.value().is_object())
        throw Error(r.where(std::string(dict_key) + "." + std::string(kv.key())),
                    "per-layer-type RoPE settings are not supported");
    for (std::string_view tk : {"rope_type", "type"}) {
      const boost::json::value* t = o.if_contains(boost::json::string_view(tk.data(), tk.size()));
      if (t == nullptr || t->is_null()) continue;
      const std::string where_t = std::string(dict_key) + "." + std::string(tk);
      if (!t->is_string()) throw Error(r.where(where_t), "must be a string, got " + json::brief(*t));
      if (t->get_string() != "default")
        throw Error(r.where(where_t), "'" + std::string(t->get_string()) +
                                          "' is not supported (fpf implements the default RoPE only)");
      break;
    }
    (dict_key == "rope_parameters" ? rope_params : rope_scaling) = &o;
  }
  // theta, first found wins: rope_parameters.rope_theta (5.x), rope_theta (4.x), rope_scaling.rope_theta, 10000.
  auto theta_in = [](const boost::json::object* o) -> const boost::json::value* {
    const boost::json::value* t = o ? o->if_contains("rope_theta") : nullptr;
    return (t == nullptr || t->is_null()) ? nullptr : t;
  };
  if (const boost::json::value* t = theta_in(rope_params)) c.rope_theta = r.to_positive_number("rope_parameters.rope_theta", *t);
  else if (const boost::json::value* t2 = r.get("rope_theta")) c.rope_theta = r.to_positive_number("rope_theta", *t2);
  else if (const boost::json::value* t3 = theta_in(rope_scaling)) c.rope_theta = r.to_positive_number("rope_scaling.rope_theta", *t3);

  if (const boost::json::value* v = r.get("rms_norm_eps")) c.rms_norm_eps = r.to_positive_number("rms_norm_eps", *v);
  c.tie_word_embeddings = r.optional_bool("tie_word_embeddings", false);
  c.attention_bias = r.optional_bool("attention_bias", false);
  {
    std::string_view key;
    if (const boost::json::value* v = r.either("dtype", "torch_dtype", &key)) {
      if (!v->is_string()) throw Error(r.where(key), "must be a string, got " + json::brief(*v));
      const std::string s(v->get_string());
      if (s != "bfloat16" && s != "float16" && s != "float32")
        throw Error(r.where(key), "'" + s + "' is not supported (bfloat16, float16 or float32)");
      c.dtype = s;
    }
  }
  if (const boost::json::value* v = r.get("max_position_embeddings"))
    c.max_position_embeddings = r.to_int64("max_position_embeddings", *v, 1);

  // Features of the architecture that the engine does not implement: refuse rather than compute something else.
  if (r.optional_bool("use_sliding_window", false))
    throw Error(r.where("use_sliding_window"), "true is not supported (fpf implements full attention only)");
  if (const std::optional<std::string> act = r.optional_string("hidden_act"); act && *act != "silu")
    throw Error(r.where("hidden_act"), "'" + *act + "' is not supported (silu only)");
  return c;
}

// Reads <dir>/config.json, or the given file.
inline ModelConfig load_config(const std::filesystem::path& config_json_or_dir) {
  std::error_code ec;
  const std::filesystem::path file = std::filesystem::is_directory(config_json_or_dir, ec)
                                         ? config_json_or_dir / "config.json"
                                         : config_json_or_dir;
  return parse_config(json::read_text_file(file), file);
}

}  // namespace fpf::io
