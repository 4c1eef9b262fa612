#pragma once
// Rewrites a dense Qwen3 / Qwen3-MoE checkpoint directory into a quantized one in the layout real checkpoints use:
// config.json gains the tool's quantization_config, each quantized Linear's `.weight` is replaced by the scheme's
// tensors (pack.hpp), every other tensor is copied byte for byte. For fpf-synth --quant awq|gptq|gptq-actorder|nf4.
//
// Quantized: the decoder layers' q/k/v/o_proj, dense-MLP gate/up/down_proj and expert gate/up/down_proj (what
// AutoAWQ, GPTQModel and transformers' bitsandbytes integration quantize); with `quantize_router` (default on for
// NF4 only, as transformers 4.x bitsandbytes replaces every nn.Linear not skipped) also the MoE router mlp.gate.
// Never: embeddings, norms, lm_head. Fused experts (transformers-5 in-memory names `mlp.experts.gate_up_proj`
// [E, 2I, H] / `mlp.experts.down_proj` [E, H, I]) are written per expert, as every quantized checkpoint stores them.
// The skip list written to the config names the full module names left dense (lm_head, routers): formats.md §8
// warns that substring matching of short names like "mlp.gate" also hits mlp.gate_proj.
//
// quantize_tensors() does the tensor part on a list held in memory (fpf-synth --quant can quantize what it
// synthesizes without writing the dense checkpoint first); quantize_checkpoint() is the directory-to-directory form.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <boost/json.hpp>

#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>
#include <fpf/io/config.hpp>
#include <fpf/io/json_util.hpp>
#include <fpf/io/safetensors.hpp>
#include <fpf/model/weights.hpp>
#include <fpf/quant/pack.hpp>

namespace fpf::quant {

enum class Scheme { Awq, Gptq, GptqActOrder, Nf4 };

// "awq" | "gptq" | "gptq-actorder" | "nf4" (fpf-synth's --quant values)
inline std::optional<Scheme> parse_scheme(std::string_view s) {
  if (s == "awq") return Scheme::Awq;
  if (s == "gptq") return Scheme::Gptq;
  if (s == "gptq-actorder") return Scheme::GptqActOrder;
  if (s == "nf4") return Scheme::Nf4;
  return std::nullopt;
}

struct QuantizeOptions {
  Scheme scheme = Scheme::Awq;
  std::int64_t group_size = 128;        // AWQ/GPTQ; -1 = one group over in_features
  bool gptq_v2 = false;                 // write checkpoint_format "gptq_v2" (zeros as is) instead of v1 "gptq"
  bool double_quant = true;             // NF4 (bnb_4bit_use_double_quant, unsloth's setting)
  std::optional<DType> scale_dtype;     // AWQ/GPTQ scales; default F16 (AutoAWQ), GPTQ: the model's 16-bit dtype
  std::optional<bool> quantize_router;  // default: true for NF4, false for AWQ/GPTQ
  std::size_t max_shard_bytes = 0;      // 0: one model.safetensors; else model-0000k-of-0000n + index
  unsigned threads = 0;                 // worker threads (0: all cores); the output does not depend on it
};

namespace detail {

// "model.layers.L.<rest>.weight" with rest one of the quantizable Linear suffixes; returns the module name (no
// ".weight"). router: set when the module is the MoE router mlp.gate.
inline std::optional<std::string> quantizable_module(const std::string& name, bool* router) {
  *router = false;
  const std::string prefix = "model.layers.", suffix = ".weight";
  if (name.rfind(prefix, 0) != 0 || name.size() <= prefix.size() + suffix.size() ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
    return std::nullopt;
  std::size_t i = prefix.size();
  const std::size_t digits = i;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
  if (i == digits || i >= name.size() || name[i] != '.') return std::nullopt;
  const std::string module = name.substr(0, name.size() - suffix.size());
  const std::string rest = module.substr(i + 1);
  for (std::string_view s : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
    if (rest == s) return module;
  if (rest == "mlp.gate") {
    *router = true;
    return module;
  }
  const std::string ex = "mlp.experts.";
  if (rest.rfind(ex, 0) == 0) {
    std::size_t j = ex.size();
    const std::size_t d0 = j;
    while (j < rest.size() && rest[j] >= '0' && rest[j] <= '9') ++j;
    if (j == d0 || j >= rest.size() || rest[j] != '.') return std::nullopt;
    const std::string proj = rest.substr(j + 1);
    if (proj == "gate_proj" || proj == "up_proj" || proj == "down_proj") return module;
  }
  return std::nullopt;
}

inline std::string dtype_torch_name(DType d) {
  return d == DType::BF16 ? "bfloat16" : d == DType::F16 ? "float16" : "float32";
}

// Keeps the bytes of the tensors written (stable addresses) and the list handed to the writer.
class TensorSink {
 public:
  template <class T>
  void add(std::string name, DType dtype, std::vector<std::int64_t> shape, const std::vector<T>& v) {
    std::vector<std::byte>& b = store_.emplace_back(v.size() * sizeof(T));
    if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
    out_.push_back({std::move(name), dtype, std::move(shape), std::span<const std::byte>(b)});
  }
  void add_floats(std::string name, DType dtype, std::vector<std::int64_t> shape, const std::vector<float>& v) {
    if (dtype == DType::F32) return add(std::move(name), dtype, std::move(shape), v);
    std::vector<std::uint16_t> h(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) h[i] = dtype == DType::BF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
    add(std::move(name), dtype, std::move(shape), h);
  }
  void copy(const io::TensorToWrite& t) { out_.push_back(t); }
  // Moves other's tensors to the end (the byte buffers move with their heap storage: spans stay valid).
  void append(TensorSink&& other) {
    for (std::vector<std::byte>& b : other.store_) store_.push_back(std::move(b));
    for (io::TensorToWrite& t : other.out_) out_.push_back(std::move(t));
    other.store_.clear();
    other.out_.clear();
  }
  const std::vector<io::TensorToWrite>& tensors() const { return out_; }

 private:
  std::deque<std::vector<std::byte>> store_;
  std::vector<io::TensorToWrite> out_;
};

}  // namespace detail

// The quantization_config a tool would write for these options (skip: full names of Linear modules left dense).
inline boost::json::object quantization_config_json(const QuantizeOptions& o, DType model_dtype,
                                                    const std::vector<std::string>& skip) {
  boost::json::array skip_list;
  for (const std::string& s : skip) skip_list.emplace_back(s);
  boost::json::object q;
  switch (o.scheme) {
    case Scheme::Awq:
      q = {{"quant_method", "awq"}, {"bits", 4}, {"group_size", o.group_size}, {"zero_point", true},
           {"version", "gemm"}, {"modules_to_not_convert", skip_list}};
      break;
    case Scheme::Gptq:
    case Scheme::GptqActOrder:
      q = {{"quant_method", "gptq"}, {"bits", 4}, {"group_size", o.group_size},
           {"desc_act", o.scheme == Scheme::GptqActOrder}, {"sym", true}, {"static_groups", false},
           {"true_sequential", true}, {"damp_percent", 0.01}, {"lm_head", false},
           {"checkpoint_format", o.gptq_v2 ? "gptq_v2" : "gptq"}, {"modules_to_not_convert", skip_list}};
      break;
    case Scheme::Nf4:
      q = {{"quant_method", "bitsandbytes"}, {"_load_in_4bit", true}, {"_load_in_8bit", false},
           {"load_in_4bit", true}, {"load_in_8bit", false}, {"bnb_4bit_quant_type", "nf4"},
           {"bnb_4bit_use_double_quant", o.double_quant}, {"bnb_4bit_compute_dtype", detail::dtype_torch_name(model_dtype)},
           {"bnb_4bit_quant_storage", "uint8"}, {"llm_int8_threshold", 6.0}, {"llm_int8_skip_modules", skip_list},
           {"llm_int8_enable_fp32_cpu_offload", false}, {"llm_int8_has_fp16_weight", false}};
      break;
  }
  return q;
}

// Writes the scheme's tensors for one Linear `module` with dense weight w [N, K] into sink.
inline void write_quantized_linear(detail::TensorSink& sink, const std::string& module, std::span<const float> w,
                                   std::int64_t N, std::int64_t K, const QuantizeOptions& o, DType model_dtype) {
  const std::string where = module + ".weight";
  try {
    switch (o.scheme) {
      case Scheme::Awq: {
        const AwqPacked p = quantize_awq(w, N, K, o.group_size, o.scale_dtype.value_or(DType::F16));
        sink.add(module + ".qweight", DType::I32, {K, N / 8}, p.qweight);
        sink.add(module + ".qzeros", DType::I32, {K / p.G, N / 8}, p.qzeros);
        sink.add_floats(module + ".scales", p.scale_dtype, {K / p.G, N}, p.scales);
        break;
      }
      case Scheme::Gptq:
      case Scheme::GptqActOrder: {
        const DType sd = o.scale_dtype.value_or(model_dtype == DType::BF16 ? DType::BF16 : DType::F16);
        std::vector<std::int64_t> perm;
        if (o.scheme == Scheme::GptqActOrder) perm = act_order_permutation(w, N, K);
        const GptqPacked p = quantize_gptq(w, N, K, o.group_size, o.gptq_v2, sd, perm);
        sink.add(module + ".qweight", DType::I32, {K / 8, N}, p.qweight);
        sink.add(module + ".qzeros", DType::I32, {p.groups, N / 8}, p.qzeros);
        sink.add_floats(module + ".scales", p.scale_dtype, {p.groups, N}, p.scales);
        sink.add(module + ".g_idx", DType::I32, {K}, p.g_idx);
        break;
      }
      case Scheme::Nf4: {
        const Nf4Packed p = quantize_nf4(w, N, K, o.double_quant, model_dtype);
        const std::string wn = module + ".weight";
        sink.add(wn, DType::U8, {static_cast<std::int64_t>(p.weight.size()), 1}, p.weight);
        const std::vector<float> code(std::begin(kNf4Code), std::end(kNf4Code));
        sink.add(wn + ".quant_map", DType::F32, {16}, code);
        if (p.nested) {
          sink.add(wn + ".absmax", DType::U8, {static_cast<std::int64_t>(p.absmax_q.size())}, p.absmax_q);
          sink.add(wn + ".nested_absmax", DType::F32, {static_cast<std::int64_t>(p.nested_absmax.size())}, p.nested_absmax);
          sink.add(wn + ".nested_quant_map", DType::F32, {256}, p.nested_quant_map);
        } else {
          sink.add(wn + ".absmax", DType::F32, {static_cast<std::int64_t>(p.absmax.size())}, p.absmax);
        }
        const std::string js = p.state_json();
        sink.add(wn + std::string(kNf4StateSuffix), DType::U8, {static_cast<std::int64_t>(js.size())},
                 std::vector<char>(js.begin(), js.end()));
        break;
      }
    }
  } catch (const Error& e) {
    throw Error(where, e.what());
  }
}

// The quantized tensor list of a dense model given as tensors (a checkpoint's, or fpf-synth's in memory): quantized
// Linears replaced by the scheme's tensors, everything else passed through (its bytes are referenced, not copied,
// so the input must outlive the result), plus the skip list for quantization_config. Errors name the tensor.
struct QuantizedTensors {
  detail::TensorSink sink;
  std::vector<std::string> skip;  // full names of the Linear modules left dense
  const std::vector<io::TensorToWrite>& tensors() const { return sink.tensors(); }
};

inline std::vector<float> widen_f32(const io::TensorToWrite& t, std::size_t offset, std::size_t count) {
  std::vector<float> out(count);
  for (std::size_t i = 0; i < count; ++i) out[i] = load_as_f32(t.bytes.data(), t.dtype, offset + i);
  return out;
}

namespace detail {

// One output piece, in input order: a pass-through tensor, or one Linear (a whole 2-D weight, or one expert's rows of
// a fused 3-D tensor).
struct QuantizeJob {
  const io::TensorToWrite* t = nullptr;
  std::string module;      // empty: pass through
  std::size_t offset = 0;  // first element of this Linear in *t
  std::int64_t N = 0, K = 0;
};

struct QuantizePlan {
  std::vector<QuantizeJob> jobs;
  std::vector<std::string> skip;  // full names of the Linear modules left dense
  std::size_t linears = 0;
};

inline QuantizePlan plan_quantization(const std::vector<io::TensorToWrite>& dense, bool tied, const QuantizeOptions& o) {
  const bool router = o.quantize_router.value_or(o.scheme == Scheme::Nf4);
  QuantizePlan plan;
  std::vector<QuantizeJob>& jobs = plan.jobs;
  bool has_lm_head = false;
  for (const io::TensorToWrite& t : dense) {
    const std::string& name = t.name;
    const std::string where = "tensor '" + name + "'";
    has_lm_head = has_lm_head || name == "lm_head.weight";
    bool is_router = false;
    const std::optional<std::string> module = quantizable_module(name, &is_router);
    const std::string fused_gu = ".mlp.experts.gate_up_proj", fused_d = ".mlp.experts.down_proj";
    const bool fused = name.rfind("model.layers.", 0) == 0 && (name.ends_with(fused_gu) || name.ends_with(fused_d));
    if (fused) {  // [E, R, C]: expert e's rows; gate_up splits into gate (first half) and up
      if (t.shape.size() != 3 || !is_float(t.dtype)) throw Error(where, "fused experts must be a 3-D float tensor");
      const std::int64_t E = t.shape[0], R = t.shape[1], C = t.shape[2];
      const std::string base = name.substr(0, name.rfind(".mlp.experts.")) + ".mlp.experts.";
      if (name.ends_with(fused_gu) && R % 2 != 0) throw Error(where, "gate_up rows must be even");
      for (std::int64_t e = 0; e < E; ++e) {
        const std::string x = base + std::to_string(e);
        const std::size_t at = static_cast<std::size_t>(e * R * C);
        if (name.ends_with(fused_gu)) {
          jobs.push_back({&t, x + ".gate_proj", at, R / 2, C});
          jobs.push_back({&t, x + ".up_proj", at + static_cast<std::size_t>(R / 2 * C), R / 2, C});
        } else {
          jobs.push_back({&t, x + ".down_proj", at, R, C});
        }
      }
      continue;
    }
    if (!module || (is_router && !router)) {
      if (module) plan.skip.push_back(*module);
      jobs.push_back({&t, "", 0, 0, 0});
      continue;
    }
    if (t.shape.size() != 2 || !is_float(t.dtype)) throw Error(where, "a Linear weight must be a 2-D float tensor");
    jobs.push_back({&t, *module, 0, t.shape[0], t.shape[1]});
  }
  if (!tied || has_lm_head) plan.skip.insert(plan.skip.begin(), "lm_head");
  for (const QuantizeJob& j : jobs) plan.linears += !j.module.empty();
  return plan;
}

}  // namespace detail

// Every Linear that quantize_tensors would quantize: (module name, in_features K), in input order.
inline std::vector<std::pair<std::string, std::int64_t>> quantized_linears(const std::vector<io::TensorToWrite>& dense,
                                                                            const QuantizeOptions& o) {
  std::vector<std::pair<std::string, std::int64_t>> out;
  for (const detail::QuantizeJob& j : detail::plan_quantization(dense, true, o).jobs)
    if (!j.module.empty()) out.emplace_back(j.module, j.K);
  return out;
}

// The AWQ/GPTQ group size for these Linears. `requested` (fpf-synth --group-size) must be -1 or positive and divide
// every in_features (an error naming the first Linear it does not divide: a partial last group is legal for GPTQ
// but not for AWQ, and real checkpoints have none). Without a request: 128 (AutoAWQ's and GPTQModel's default, that
// of the published Qwen3 checkpoints) when it divides every in_features, else the largest divisor of all of them
// below 128 (the tiny test shapes have in_features 16..128). `where` names the option in errors.
inline std::int64_t resolve_group_size(const std::vector<std::pair<std::string, std::int64_t>>& linears,
                                       std::optional<std::int64_t> requested, const std::string& where = "group size") {
  if (requested) {
    const std::int64_t g = *requested;
    if (g != -1 && g < 1) throw Error(where, "must be -1 (one group over in_features) or positive, got " + std::to_string(g));
    if (g != -1)
      for (const auto& [module, K] : linears)
        if (K % g != 0)
          throw Error(where, std::to_string(g) + " does not divide in_features " + std::to_string(K) + " of " + module);
    return g;
  }
  std::int64_t all = 0;  // gcd of every in_features
  for (const auto& [module, K] : linears) all = std::gcd(all, K);
  if (all == 0 || all % 128 == 0) return 128;
  for (std::int64_t g = std::min<std::int64_t>(all, 127); g > 1; --g)
    if (all % g == 0) return g;
  return 1;
}

// quantize_tensors' result delivered in batches of consecutive output pieces (Linears of about batch_elements dense
// elements in all, with the pass-through tensors between them), in input order: emit(sink) is called once per batch
// on the calling thread, and progress(done, total) counts Linears after each batch. Only one batch of quantized
// bytes is held at a time, which is what lets fpf-synth quantize the ~19,400 Linears of the real shape (16 GB of
// output) without holding them; the batching, like the thread count, does not change the bytes. Returns the skip
// list for quantization_config.
inline std::vector<std::string> quantize_tensors_streamed(
    const std::vector<io::TensorToWrite>& dense, DType model_dtype, bool tied, const QuantizeOptions& o,
    const std::function<void(detail::TensorSink&&)>& emit,
    const std::function<void(std::size_t done, std::size_t total)>& progress = {},
    std::size_t batch_elements = std::size_t{1} << 26) {
  if (o.group_size != -1 && o.group_size < 1)
    throw Error("group size", "must be -1 or positive, got " + std::to_string(o.group_size));
  // Jobs run on worker threads, each into its own sink; the sinks are joined in job order, so the result (and the
  // first error reported) does not depend on the thread count.
  const detail::QuantizePlan plan = detail::plan_quantization(dense, tied, o);
  const std::vector<detail::QuantizeJob>& jobs = plan.jobs;
  const unsigned threads = std::max(1u, o.threads ? o.threads : std::thread::hardware_concurrency());
  std::size_t done = 0;
  for (std::size_t begin = 0; begin < jobs.size();) {
    std::size_t end = begin, elements = 0;
    while (end < jobs.size() && (end == begin || elements < batch_elements)) {
      elements += static_cast<std::size_t>(jobs[end].N * jobs[end].K);
      ++end;
    }
    const std::size_t count = end - begin;
    std::vector<detail::TensorSink> out(count);
    std::vector<std::exception_ptr> errors(count);
    std::atomic<std::size_t> next{0};
    auto work = [&] {
      for (std::size_t i; (i = next.fetch_add(1)) < count;) {
        const detail::QuantizeJob& job = jobs[begin + i];
        try {
          if (job.module.empty()) {
            out[i].copy(*job.t);
          } else {
            const std::vector<float> w = widen_f32(*job.t, job.offset, static_cast<std::size_t>(job.N * job.K));
            write_quantized_linear(out[i], job.module, w, job.N, job.K, o, model_dtype);
          }
        } catch (...) {
          errors[i] = std::current_exception();
        }
      }
    };
    std::vector<std::thread> pool;
    for (unsigned t = 1; t < std::min<std::size_t>(threads, count); ++t) pool.emplace_back(work);
    work();
    for (std::thread& th : pool) th.join();
    detail::TensorSink batch;
    for (std::size_t i = 0; i < count; ++i) {
      if (errors[i]) std::rethrow_exception(errors[i]);
      batch.append(std::move(out[i]));
      done += !jobs[begin + i].module.empty();
    }
    emit(std::move(batch));
    if (progress) progress(done, plan.linears);
    begin = end;
  }
  return plan.skip;
}

// model_dtype: the float dtype of the dense model (config.json's); tied: tie_word_embeddings.
inline QuantizedTensors quantize_tensors(const std::vector<io::TensorToWrite>& dense, DType model_dtype, bool tied,
                                         const QuantizeOptions& o) {
  QuantizedTensors q;
  q.skip = quantize_tensors_streamed(dense, model_dtype, tied, o,
                                     [&](detail::TensorSink&& batch) { q.sink.append(std::move(batch)); });
  return q;
}

// Reads the dense checkpoint in src (config.json + safetensors), writes the quantized one to dst (created; weight
// files of an earlier run there are removed). Also copies generation_config.json and tokenizer files when present.
inline void quantize_checkpoint(const std::filesystem::path& src, const std::filesystem::path& dst,
                                const QuantizeOptions& o,
                                const std::function<void(std::size_t done, std::size_t total)>& progress = {}) {
  namespace fs = std::filesystem;
  const io::ModelConfig cfg = io::load_config(src);
  const fs::path cfg_file = src / "config.json";
  boost::json::value root = io::json::parse(io::json::read_text_file(cfg_file), cfg_file.string());
  if (root.get_object().if_contains("quantization_config") && !root.get_object().at("quantization_config").is_null())
    throw Error(cfg_file.string() + ": quantization_config", "present: the source checkpoint is already quantized");
  const DType model_dtype = model::config_float_dtype(cfg).value_or(DType::F32);

  const io::Checkpoint ckpt = io::Checkpoint::open(src);
  std::vector<io::TensorToWrite> dense;
  for (const std::string& name : ckpt.names()) {
    const io::TensorInfo& t = ckpt.get(name);
    dense.push_back({t.name, t.dtype, t.shape, t.bytes});
  }
  std::error_code ec;
  if (fs::exists(dst, ec) && fs::equivalent(src, dst, ec))
    throw Error(dst.string(), "the output directory must differ from the source checkpoint");
  fs::create_directories(dst, ec);
  if (ec) throw Error(dst.string(), "cannot create directory: " + ec.message());
  // Stale weights from an earlier run would shadow or mix with the new ones (model.safetensors wins over an index).
  for (const fs::directory_entry& e : fs::directory_iterator(dst))
    if (const std::string f = e.path().filename().string();
        f == io::kSingleFileName || f == io::kIndexFileName || (f.rfind("model-", 0) == 0 && f.ends_with(".safetensors")))
      fs::remove(e.path());
  std::vector<std::string> skip;
  try {
    if (o.max_shard_bytes == 0) {  // one file: its header lists every tensor, so all are held
      QuantizedTensors q = quantize_tensors(dense, model_dtype, cfg.tie_word_embeddings, o);
      io::write_safetensors(dst / io::kSingleFileName, q.tensors());
      skip = std::move(q.skip);
    } else {  // shard by shard: only one shard and one batch of quantized tensors held
      io::ShardedCheckpointWriter writer(dst, o.max_shard_bytes);
      skip = quantize_tensors_streamed(
          dense, model_dtype, cfg.tie_word_embeddings, o,
          [&](detail::TensorSink&& batch) {
            for (const io::TensorToWrite& t : batch.tensors()) writer.add(t);
          },
          progress);
      writer.finish();
    }
  } catch (const Error& e) {
    throw Error(src.string(), e.what());
  }

  root.get_object()["quantization_config"] = quantization_config_json(o, model_dtype, skip);
  const std::string text = boost::json::serialize(root) + "\n";
  io::detail::write_file_atomically(dst / "config.json", {std::as_bytes(std::span<const char>(text.data(), text.size()))});
  for (const char* f : {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                        "special_tokens_map.json", "chat_template.jinja"})
    if (fs::exists(src / f, ec)) fs::copy_file(src / f, dst / f, fs::copy_options::overwrite_existing, ec);
}

}  // namespace fpf::quant
