// Checkpoint I/O: how long opening (mmap + full header validation) takes for a checkpoint laid out like
// Qwen3-30B-A3B (16 shards, ~18.9k tensors, ~57 GiB; sparse files, so no disk is used and nothing is read), and the
// writer's throughput. Opening must not scale with the data size: only headers are parsed.
#include <benchmark/benchmark.h>

#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include <fpf/io/safetensors.hpp>

namespace fs = std::filesystem;
using namespace fpf;
using namespace fpf::io;

namespace {

struct Spec {
  std::string name;
  std::vector<std::int64_t> shape;
};

// Tensor names and shapes of Qwen3-30B-A3B (bf16), in checkpoint order.
std::vector<Spec> qwen3_30b_a3b() {
  const std::int64_t H = 2048, V = 151936, Q = 32 * 128, KV = 4 * 128, E = 128, I = 768;
  std::vector<Spec> s{{"model.embed_tokens.weight", {V, H}}};
  for (int l = 0; l < 48; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    s.push_back({p + "input_layernorm.weight", {H}});
    s.push_back({p + "post_attention_layernorm.weight", {H}});
    s.push_back({p + "self_attn.q_proj.weight", {Q, H}});
    s.push_back({p + "self_attn.k_proj.weight", {KV, H}});
    s.push_back({p + "self_attn.v_proj.weight", {KV, H}});
    s.push_back({p + "self_attn.o_proj.weight", {H, Q}});
    s.push_back({p + "self_attn.q_norm.weight", {128}});
    s.push_back({p + "self_attn.k_norm.weight", {128}});
    s.push_back({p + "mlp.gate.weight", {E, H}});
    for (int e = 0; e < E; ++e) {
      const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
      s.push_back({x + "gate_proj.weight", {I, H}});
      s.push_back({x + "up_proj.weight", {I, H}});
      s.push_back({x + "down_proj.weight", {H, I}});
    }
  }
  s.push_back({"model.norm.weight", {H}});
  s.push_back({"lm_head.weight", {V, H}});
  return s;
}

// Writes the checkpoint's headers and sizes its files with holes (no data blocks). Returns the total data bytes.
std::uint64_t make_sparse_checkpoint(const fs::path& dir, int n_shards) {
  const std::vector<Spec> specs = qwen3_30b_a3b();
  std::uint64_t total = 0;
  for (const Spec& s : specs) total += 2 * static_cast<std::uint64_t>(s.shape.size() == 1 ? s.shape[0] : s.shape[0] * s.shape[1]);
  const std::uint64_t per_shard = total / static_cast<std::uint64_t>(n_shards) + 1;
  boost::json::object weight_map;
  std::size_t i = 0;
  for (int k = 1; k <= n_shards; ++k) {
    char fname[64];
    std::snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", k, n_shards);
    boost::json::object header{{"__metadata__", {{"format", "pt"}}}};
    std::uint64_t off = 0;
    for (; i < specs.size() && off < per_shard; ++i) {
      std::uint64_t bytes = 2;
      boost::json::array shape;
      for (std::int64_t d : specs[i].shape) bytes *= static_cast<std::uint64_t>(d), shape.emplace_back(d);
      header[specs[i].name] = {{"dtype", "BF16"}, {"shape", shape}, {"data_offsets", {off, off + bytes}}};
      weight_map[specs[i].name] = fname;
      off += bytes;
    }
    std::string text = boost::json::serialize(header);
    text.append((8 - text.size() % 8) % 8, ' ');
    std::string head(8, '\0');
    for (int b = 0; b < 8; ++b) head[static_cast<std::size_t>(b)] = static_cast<char>((text.size() >> (8 * b)) & 0xff);
    {
      std::ofstream out(dir / fname, std::ios::binary);
      out << head << text;
    }
    fs::resize_file(dir / fname, 8 + text.size() + off);
  }
  boost::json::object index{{"metadata", {{"total_size", total}}}};
  index["weight_map"] = std::move(weight_map);
  std::ofstream(dir / "model.safetensors.index.json") << boost::json::serialize(index);
  return total;
}

fs::path temp_dir() {
  std::string tmpl = (fs::temp_directory_path() / "fpf_bench_io_XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
  return tmpl;
}

void BM_OpenQwen3_30B_A3B_Layout(benchmark::State& state) {
  const fs::path dir = temp_dir();
  const std::uint64_t total = make_sparse_checkpoint(dir, 16);
  std::size_t n = 0;
  for (auto _ : state) {
    const Checkpoint c = Checkpoint::open(dir);
    n = c.names().size();
    benchmark::DoNotOptimize(c.find("lm_head.weight"));
  }
  state.counters["tensors"] = static_cast<double>(n);
  state.counters["GiB"] = static_cast<double>(total) / (1ull << 30);
  fs::remove_all(dir);
}
BENCHMARK(BM_OpenQwen3_30B_A3B_Layout)->Unit(benchmark::kMillisecond);

void BM_WriteSafetensors(benchmark::State& state) {
  const fs::path dir = temp_dir();
  const std::size_t mib = static_cast<std::size_t>(state.range(0));
  std::vector<std::byte> data(mib << 20, std::byte{0x3c});
  std::vector<TensorToWrite> ts;
  const std::size_t n = 16, each = data.size() / n;
  for (std::size_t k = 0; k < n; ++k)
    ts.push_back({"t" + std::to_string(k), DType::F32, {static_cast<std::int64_t>(each / 4)}, {data.data() + k * each, each}});
  for (auto _ : state) write_safetensors(dir / "w.safetensors", ts);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * data.size()));
  fs::remove_all(dir);
}
BENCHMARK(BM_WriteSafetensors)->Arg(64)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
