// config.json parsing for qwen3 / qwen3_moe: the HF-written fixtures (transformers 5.17), a transformers 4.x
// config (Qwen3-30B-A3B as published), both spellings of every renamed key, the layer-type rule, and one test per
// kind of bad input. Every error must name the file and the field.
#include <doctest/doctest.h>

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include <fpf/io/config.hpp>

namespace fs = std::filesystem;
using namespace fpf;
using namespace fpf::io;

namespace {

// Qwen/Qwen3-30B-A3B config.json as published (transformers 4.51 spellings), see docs/formats.md 1.1.
const char* const kQwen3MoeV4 = R"({
  "architectures": ["Qwen3MoeForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 6144,
  "max_position_embeddings": 40960,
  "max_window_layers": 48,
  "mlp_only_layers": [],
  "model_type": "qwen3_moe",
  "moe_intermediate_size": 768,
  "norm_topk_prob": true,
  "num_attention_heads": 32,
  "num_experts": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 48,
  "num_key_value_heads": 4,
  "output_router_logits": false,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.001,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

// A small dense qwen3 config in transformers 5.x spellings.
const char* const kQwen3DenseV5 = R"({
  "architectures": ["Qwen3ForCausalLM"],
  "dtype": "float16",
  "head_dim": 16,
  "hidden_size": 48,
  "intermediate_size": 96,
  "model_type": "qwen3",
  "num_attention_heads": 4,
  "num_hidden_layers": 4,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
  "tie_word_embeddings": true,
  "vocab_size": 384
})";

const fs::path kFile = "cfg/config.json";

// The base config with edits applied (keys set, or erased when the value is the string "<erase>").
std::string edited(const char* base, const std::function<void(boost::json::object&)>& edit) {
  boost::json::value v = boost::json::parse(base);
  edit(v.as_object());
  return boost::json::serialize(v);
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const fpf::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not an fpf::Error: ") + e.what() + ">";
  }
  return "<no exception>";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string parse_error(const std::string& text) {
  return error_of([&] { parse_config(text, kFile); });
}

}  // namespace

TEST_CASE("config: Qwen3-30B-A3B as published (transformers 4.x spellings)") {
  const ModelConfig c = parse_config(kQwen3MoeV4, kFile);
  CHECK(c.file == kFile);
  CHECK(c.model_type == "qwen3_moe");
  CHECK(c.hidden_size == 2048);
  CHECK(c.num_hidden_layers == 48);
  CHECK(c.num_attention_heads == 32);
  CHECK(c.num_key_value_heads == 4);
  CHECK(c.head_dim == 128);  // explicit, and != hidden_size / heads (64)
  CHECK(c.intermediate_size == 6144);
  CHECK(c.moe_intermediate_size == 768);
  CHECK(c.num_experts == 128);
  CHECK(c.num_experts_per_tok == 8);
  CHECK(c.norm_topk_prob);
  CHECK(c.decoder_sparse_step == 1);
  CHECK(c.mlp_only_layers.empty());
  CHECK(c.vocab_size == 151936);
  CHECK(c.rope_theta == 1000000.0);
  CHECK(c.rope_type == "default");
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK_FALSE(c.attention_bias);
  CHECK(c.dtype == "bfloat16");
  CHECK(c.max_position_embeddings == 40960);
  CHECK(c.is_moe());
  for (int l = 0; l < 48; ++l) CHECK(c.is_moe_layer(l));
}

TEST_CASE("config: transformers 5.x spellings (dtype, rope_parameters, num_local_experts)") {
  const ModelConfig d = parse_config(kQwen3DenseV5, kFile);
  CHECK(d.model_type == "qwen3");
  CHECK(d.dtype == "float16");
  CHECK(d.rope_theta == 500000.0);
  CHECK(d.rms_norm_eps == 1e-5);
  CHECK(d.tie_word_embeddings);
  CHECK(d.head_dim == 16);
  CHECK_FALSE(d.is_moe());
  CHECK(d.max_position_embeddings == 32768);  // HF default when absent

  const ModelConfig m = parse_config(edited(kQwen3MoeV4,
                                            [](boost::json::object& o) {
                                              o.erase("num_experts");
                                              o["num_local_experts"] = 64;
                                              o.erase("torch_dtype");
                                              o["dtype"] = "float32";
                                              o.erase("rope_theta");
                                              o.erase("rope_scaling");
                                              o["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 250000}};
                                            }),
                                     kFile);
  CHECK(m.num_experts == 64);
  CHECK(m.dtype == "float32");
  CHECK(m.rope_theta == 250000.0);  // an integer in JSON is fine for a float field
  // both spellings present and equal: fine
  CHECK(parse_config(edited(kQwen3MoeV4, [](boost::json::object& o) { o["num_local_experts"] = 128; }), kFile).num_experts ==
        128);
  CHECK(parse_config(edited(kQwen3MoeV4, [](boost::json::object& o) { o["dtype"] = "bfloat16"; }), kFile).dtype == "bfloat16");
  // 4.x rope_scaling of type default carrying no theta: the top-level rope_theta stays
  CHECK(parse_config(edited(kQwen3MoeV4, [](boost::json::object& o) { o["rope_scaling"] = {{"rope_type", "default"}}; }), kFile)
            .rope_theta == 1000000.0);
}

TEST_CASE("config: where rope_theta comes from") {
  auto theta = [](const std::function<void(boost::json::object&)>& edit) {
    return parse_config(edited(kQwen3MoeV4, edit), kFile).rope_theta;
  };
  CHECK(theta([](boost::json::object&) {}) == 1e6);  // 4.x top level
  // 5.x rope_parameters wins over a leftover top-level key
  CHECK(theta([](boost::json::object& o) { o["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5e5}}; }) == 5e5);
  // rope_parameters without a theta: the top-level key
  CHECK(theta([](boost::json::object& o) { o["rope_parameters"] = {{"rope_type", "default"}}; }) == 1e6);
  // only inside rope_scaling
  CHECK(theta([](boost::json::object& o) {
          o.erase("rope_theta");
          o["rope_scaling"] = {{"rope_type", "default"}, {"rope_theta", 2e4}};
        }) == 2e4);
  CHECK(theta([](boost::json::object& o) { o.erase("rope_theta"); }) == 10000.0);
}

TEST_CASE("config: defaults when optional keys are absent") {
  const ModelConfig c = parse_config(edited(kQwen3MoeV4,
                                            [](boost::json::object& o) {
                                              for (const char* k : {"norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                                                                    "rope_theta", "rope_scaling", "torch_dtype", "rms_norm_eps",
                                                                    "tie_word_embeddings", "attention_bias",
                                                                    "max_position_embeddings"})
                                                o.erase(k);
                                            }),
                                     kFile);
  CHECK_FALSE(c.norm_topk_prob);  // HF Qwen3MoeConfig default
  CHECK(c.decoder_sparse_step == 1);
  CHECK(c.mlp_only_layers.empty());
  CHECK(c.rope_theta == 10000.0);
  CHECK(c.dtype == "float32");
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK_FALSE(c.attention_bias);
  CHECK(c.max_position_embeddings == 32768);
  // explicit nulls read like absent keys (transformers writes "mlp_only_layers": null, "torch_dtype": null at times)
  const ModelConfig n = parse_config(edited(kQwen3MoeV4,
                                            [](boost::json::object& o) {
                                              o["mlp_only_layers"] = nullptr;
                                              o["torch_dtype"] = nullptr;
                                              o["num_key_value_heads"] = nullptr;  // null: same as num_attention_heads
                                            }),
                                     kFile);
  CHECK(n.mlp_only_layers.empty());
  CHECK(n.dtype == "float32");
  CHECK(n.num_key_value_heads == 32);
}

TEST_CASE("config: head_dim absent or present") {
  // qwen3_moe: Qwen3MoeAttention falls back to hidden_size / num_attention_heads
  const ModelConfig m = parse_config(edited(kQwen3MoeV4, [](boost::json::object& o) { o.erase("head_dim"); }), kFile);
  CHECK(m.head_dim == 2048 / 32);
  // qwen3 (dense): Qwen3Config declares head_dim = 128 as its default, which transformers uses when absent
  const ModelConfig d = parse_config(edited(kQwen3DenseV5, [](boost::json::object& o) { o.erase("head_dim"); }), kFile);
  CHECK(d.head_dim == 128);
  // present and different from hidden / heads: taken as is
  CHECK(parse_config(edited(kQwen3DenseV5, [](boost::json::object& o) { o["head_dim"] = 40; }), kFile).head_dim == 40);
}

TEST_CASE("config: layer-type rule (decoder_sparse_step, mlp_only_layers)") {
  const ModelConfig c = parse_config(edited(kQwen3MoeV4,
                                            [](boost::json::object& o) {
                                              o["num_hidden_layers"] = 6;
                                              o["decoder_sparse_step"] = 2;
                                              o["mlp_only_layers"] = boost::json::array{3};
                                            }),
                                     kFile);
  // sparse iff (l+1) % 2 == 0 and l not in [3]: layers 1 and 5
  const std::vector<bool> expect{false, true, false, false, false, true};
  for (int l = 0; l < 6; ++l) CHECK(c.is_moe_layer(l) == expect[static_cast<std::size_t>(l)]);
  CHECK(c.mlp_only_layers == std::vector<int>{3});

  // qwen3_moe with num_experts 0 is dense everywhere, and its MoE sizes read as 0
  const ModelConfig z = parse_config(edited(kQwen3MoeV4, [](boost::json::object& o) { o["num_experts"] = 0; }), kFile);
  CHECK_FALSE(z.is_moe());
  CHECK(z.num_experts_per_tok == 0);
  CHECK(z.moe_intermediate_size == 0);
  for (int l = 0; l < 48; ++l) CHECK_FALSE(z.is_moe_layer(l));

  // a qwen3 (dense) config that carries MoE keys is still dense: Qwen3ForCausalLM ignores them
  const ModelConfig d = parse_config(edited(kQwen3DenseV5,
                                            [](boost::json::object& o) {
                                              o["num_experts"] = 8;
                                              o["num_experts_per_tok"] = 2;
                                            }),
                                     kFile);
  CHECK_FALSE(d.is_moe());
  CHECK_FALSE(d.is_moe_layer(0));

  // every layer sparse: intermediate_size may be absent (no dense layer uses it)
  CHECK(parse_config(edited(kQwen3MoeV4, [](boost::json::object& o) { o.erase("intermediate_size"); }), kFile)
            .intermediate_size == 0);
}

TEST_CASE("config: HF-written fixtures (transformers 5.17) and load_config from a directory or a file") {
  const fs::path models = fs::path(FPF_SOURCE_DIR) / "tests/fixtures/models";
  if (!fs::exists(models / "moe_sparse_step")) return;  // fixtures not checked out
  const ModelConfig s = load_config(models / "moe_sparse_step");
  CHECK(s.file == models / "moe_sparse_step/config.json");
  CHECK(s.model_type == "qwen3_moe");
  CHECK(s.num_experts == 8);  // written as num_local_experts by 5.x
  CHECK(s.decoder_sparse_step == 2);
  CHECK(s.mlp_only_layers == std::vector<int>{3});
  CHECK(s.norm_topk_prob);
  CHECK(s.rope_theta == 1000000.0);
  CHECK(s.is_moe_layer(1));
  CHECK_FALSE(s.is_moe_layer(0));
  CHECK_FALSE(s.is_moe_layer(3));  // in mlp_only_layers

  const ModelConfig d = load_config(models / "dense_tied/config.json");
  CHECK(d.model_type == "qwen3");
  CHECK(d.tie_word_embeddings);
  CHECK(d.head_dim == 16);
  CHECK(d.dtype == "float32");
  CHECK(d.max_position_embeddings == 256);

  const ModelConfig b = load_config(models / "moe_bf16_sharded");
  CHECK(b.dtype == "bfloat16");
  CHECK(b.num_experts == 4);
  CHECK_FALSE(b.norm_topk_prob);

  const ModelConfig nn = load_config(models / "moe_no_norm");
  CHECK(nn.num_key_value_heads == 1);
  CHECK(nn.num_experts_per_tok == 3);
}

// ---- bad input: one test each ----------------------------------------------------------------------------------

TEST_CASE("config bad input: not JSON") {
  const std::string msg = parse_error("{\n  \"model_type\": \"qwen3\",\n  \"hidden_size\": 48,,\n}");
  CHECK(contains(msg, "cfg/config.json: not valid JSON"));
  CHECK(contains(msg, "line 3"));
  CHECK(contains(parse_error(""), "cfg/config.json: not valid JSON"));
}

TEST_CASE("config bad input: not an object") {
  CHECK(parse_error("[1, 2]") == "cfg/config.json: must be a JSON object, got array");
}

TEST_CASE("config bad input: missing required field") {
  for (const char* key : {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                          "model_type", "num_experts_per_tok", "moe_intermediate_size"}) {
    CAPTURE(key);
    const std::string msg = parse_error(edited(kQwen3MoeV4, [&](boost::json::object& o) { o.erase(key); }));
    CHECK(msg == "cfg/config.json: " + std::string(key) + ": missing (required)");
  }
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o.erase("num_experts"); })),
                 "cfg/config.json: num_experts: missing"));
  // intermediate_size is required as soon as one layer is dense
  CHECK(parse_error(edited(kQwen3DenseV5, [](boost::json::object& o) { o.erase("intermediate_size"); })) ==
        "cfg/config.json: intermediate_size: missing (required)");
}

TEST_CASE("config bad input: wrong type or out-of-range value") {
  CHECK(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["hidden_size"] = "abc"; })) ==
        "cfg/config.json: hidden_size: must be an integer, got \"abc\"");
  CHECK(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["hidden_size"] = -2048; })) ==
        "cfg/config.json: hidden_size: must be in [1, 2147483647], got -2048");
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["num_hidden_layers"] = 4.5; })),
                 "cfg/config.json: num_hidden_layers: must be an integer"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["vocab_size"] = 0; })),
                 "cfg/config.json: vocab_size: must be >= 1"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["norm_topk_prob"] = "true"; })),
                 "cfg/config.json: norm_topk_prob: must be true or false"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["rope_theta"] = "1e6"; })),
                 "cfg/config.json: rope_theta: must be a number"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["rms_norm_eps"] = 0; })),
                 "cfg/config.json: rms_norm_eps: must be a positive"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["decoder_sparse_step"] = 0; })),
                 "cfg/config.json: decoder_sparse_step: must be in [1,"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["mlp_only_layers"] = {0, 48}; })),
                 "cfg/config.json: mlp_only_layers: must be in [0, 47], got 48"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["mlp_only_layers"] = 3; })),
                 "cfg/config.json: mlp_only_layers: must be an array"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["torch_dtype"] = "float64"; })),
                 "cfg/config.json: torch_dtype: 'float64' is not supported"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["rope_scaling"] = "yes"; })),
                 "cfg/config.json: rope_scaling: must be an object or null"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["head_dim"] = 0; })),
                 "cfg/config.json: head_dim: must be in [1,"));
}

TEST_CASE("config bad input: unknown model_type") {
  CHECK(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["model_type"] = "llama"; })) ==
        "cfg/config.json: model_type: 'llama' is not supported (fpf loads qwen3 and qwen3_moe)");
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["model_type"] = 3; })),
                 "cfg/config.json: model_type: must be a string"));
}

TEST_CASE("config bad input: head layout inconsistent") {
  CHECK(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["num_key_value_heads"] = 5; })) ==
        "cfg/config.json: num_key_value_heads: 5 does not divide num_attention_heads (32)");
  // head_dim absent and hidden_size not a multiple of the head count: no head size to derive
  CHECK(contains(parse_error(edited(kQwen3MoeV4,
                                    [](boost::json::object& o) {
                                      o.erase("head_dim");
                                      o["hidden_size"] = 2050;
                                    })),
                 "cfg/config.json: head_dim: absent, and hidden_size (2050) is not a multiple of num_attention_heads (32)"));
}

TEST_CASE("config bad input: num_experts_per_tok > num_experts") {
  CHECK(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["num_experts_per_tok"] = 129; })) ==
        "cfg/config.json: num_experts_per_tok: 129 exceeds num_experts (128)");
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["num_experts_per_tok"] = 0; })),
                 "cfg/config.json: num_experts_per_tok: must be in [1,"));
}

TEST_CASE("config bad input: the two spellings of a key disagree") {
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["num_local_experts"] = 64; })),
                 "cfg/config.json: num_experts: disagrees with num_local_experts (128 vs 64)"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["dtype"] = "float16"; })),
                 "cfg/config.json: dtype: disagrees with torch_dtype"));
}

TEST_CASE("config bad input: unsupported architecture features") {
  CHECK(contains(parse_error(edited(kQwen3MoeV4,
                                    [](boost::json::object& o) {
                                      o["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
                                    })),
                 "cfg/config.json: rope_scaling.rope_type: 'yarn' is not supported"));
  CHECK(contains(parse_error(edited(kQwen3MoeV4, [](boost::json::object& o) { o["rope_scaling"] = {{"type", "linear"}}; })),
                 "cfg/config.json: rope_scaling.type: 'linear' is not supported"));
  CHECK(contains(parse_error(edited(kQwen3DenseV5,
                                    [](boost::json::object& o) {
                                      o["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 1e4}};
                                    })),
                 "cfg/config.json: rope_parameters.rope_type: 'llama3' is not supported"));
  CHECK(contains(parse_error(edited(kQwen3DenseV5,
                                    [](boost::json::object& o) {
                                      o["rope_parameters"] = {{"full_attention", {{"rope_type", "default"}}}};
                                    })),
                 "cfg/config.json: rope_parameters.full_attention: per-layer-type RoPE settings are not supported"));
  CHECK(contains(parse_error(edited(kQwen3DenseV5, [](boost::json::object& o) { o["use_sliding_window"] = true; })),
                 "cfg/config.json: use_sliding_window: true is not supported"));
  CHECK(contains(parse_error(edited(kQwen3DenseV5, [](boost::json::object& o) { o["hidden_act"] = "gelu"; })),
                 "cfg/config.json: hidden_act: 'gelu' is not supported"));
}

TEST_CASE("config bad input: file missing") {
  std::string tmpl = (fs::temp_directory_path() / "fpf_cfg_XXXXXX").string();
  REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
  const fs::path dir = tmpl;
  const std::string msg = error_of([&] { load_config(dir); });
  CHECK(contains(msg, (dir / "config.json").string() + ": cannot open"));
  {
    std::ofstream(dir / "config.json") << "{\"model_type\": \"qwen3\"";
  }
  CHECK(contains(error_of([&] { load_config(dir); }), (dir / "config.json").string() + ": not valid JSON"));
  fs::remove_all(dir);
}
