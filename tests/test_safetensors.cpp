// safetensors reader/writer and sharded checkpoints: round trips through the writer, the HF-made fixtures, and one
// test per kind of bad input (hand-built or hand-corrupted files in a temp dir). Every error must name the file and
// the field (and tensor) at fault.
#include <doctest/doctest.h>

#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <algorithm>
#include <bit>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include <fpf/io/safetensors.hpp>

namespace fs = std::filesystem;
using namespace fpf;
using namespace fpf::io;

namespace {

// A fresh directory under $TMPDIR, removed with everything in it at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "fpf_st_XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

void write_raw(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::string read_raw(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string u64le(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file from header text and a data buffer, exactly as given (no validation, no padding).
std::string st_bytes(const std::string& header, const std::string& data) {
  return u64le(header.size()) + header + data;
}

// The message of the fpf::Error that f throws, or a marker that fails every "contains" check.
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

// Opens a file built from header + data and returns the error message.
std::string open_error(const TempDir& dir, const std::string& header, const std::string& data) {
  const fs::path p = dir / "bad.safetensors";
  write_raw(p, st_bytes(header, data));
  return error_of([&] { SafetensorsFile::open(p); });
}

std::span<const std::byte> as_span(const std::vector<std::byte>& v) { return {v.data(), v.size()}; }

std::vector<std::byte> random_bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng() & 0xff);
  return v;
}

}  // namespace

TEST_CASE("safetensors: every dtype, rank 0 and zero-size tensors round-trip bit-identically") {
  TempDir dir;
  const DType all[] = {DType::BOOL, DType::U8, DType::I8, DType::I16, DType::I32,
                       DType::I64,  DType::F16, DType::BF16, DType::F32, DType::F64};
  std::vector<std::vector<std::byte>> storage;
  std::vector<TensorToWrite> ts;
  std::uint32_t seed = 1;
  for (DType t : all) {
    const std::vector<std::int64_t> shape{3, 5};
    storage.push_back(random_bytes(15 * dtype_size(t), seed++));
    if (t == DType::BOOL)
      for (auto& b : storage.back()) b &= std::byte{1};
    ts.push_back({"w." + std::string(dtype_name(t)), t, shape, as_span(storage.back())});
  }
  storage.push_back(random_bytes(4, 99));
  ts.push_back({"scalar", DType::F32, {}, as_span(storage.back())});  // rank 0: one element
  ts.push_back({"empty", DType::BF16, {0, 7}, {}});                  // zero-size
  ts.push_back({"empty2", DType::F64, {4, 0}, {}});                  // another zero-size, same offset
  const fs::path p = dir / "all.safetensors";
  write_safetensors(p, ts, {{"format", "pt"}, {"note", "fpf test"}});

  // No temp file left behind: the write is temp + rename.
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);

  const SafetensorsFile f = SafetensorsFile::open(p);
  CHECK(f.path() == p);
  CHECK((8 + f.header_size()) % 8 == 0);  // padded so the data buffer starts 8-aligned
  CHECK(read_raw(p)[8] == '{');
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "fpf test");
  REQUIRE(f.tensors().size() == ts.size());
  for (const TensorToWrite& w : ts) {
    const TensorInfo* t = f.find(w.name);
    REQUIRE(t != nullptr);
    CHECK(t->name == w.name);
    CHECK(t->dtype == w.dtype);
    CHECK(t->shape == w.shape);
    CHECK(t->file == p);
    REQUIRE(t->bytes.size() == w.bytes.size());
    CHECK(std::memcmp(t->bytes.data(), w.bytes.data(), w.bytes.size()) == 0);
    // the writer orders by element size (descending), so every tensor is aligned to its element size
    CHECK(reinterpret_cast<std::uintptr_t>(t->bytes.data()) % dtype_size(t->dtype) == 0);
  }
  CHECK(f.find("scalar")->numel() == 1);
  CHECK(f.find("scalar")->shape.empty());
  CHECK(f.find("empty")->numel() == 0);
  CHECK(f.find("w.F32")->numel() == 15);
  CHECK(f.find("absent") == nullptr);
  // tensors() is in data-offset order: each starts where the previous ended
  for (std::size_t i = 1; i < f.tensors().size(); ++i)
    CHECK(f.tensors()[i].bytes.data() == f.tensors()[i - 1].bytes.data() + f.tensors()[i - 1].bytes.size());
  // F32 values read through the mmap equal the written ones
  float x0 = 0;
  std::memcpy(&x0, ts[8].bytes.data(), 4);
  CHECK(std::bit_cast<std::uint32_t>(load_as_f32(f.find("w.F32")->bytes.data(), DType::F32, 0)) ==
        std::bit_cast<std::uint32_t>(x0));
}

TEST_CASE("safetensors: the file object is movable and its views stay valid; no copy at open") {
  TempDir dir;
  const std::vector<std::byte> data = random_bytes(64, 7);
  write_safetensors(dir / "a.safetensors", {{"t", DType::F32, {16}, as_span(data)}});
  SafetensorsFile a = SafetensorsFile::open(dir / "a.safetensors");
  const std::byte* before = a.find("t")->bytes.data();
  // zero-copy: the view points into the mapping at data_offset, not into a private buffer
  CHECK(a.tensors().front().bytes.data() != nullptr);
  SafetensorsFile b = std::move(a);
  const TensorInfo* t = b.find("t");
  REQUIRE(t != nullptr);
  CHECK(t->bytes.data() == before);
  CHECK(std::memcmp(t->bytes.data(), data.data(), data.size()) == 0);
  std::vector<SafetensorsFile> v;
  v.push_back(std::move(b));
  CHECK(v[0].find("t")->bytes.data() == before);
}

TEST_CASE("safetensors: the writer refuses inconsistent input and overwrites atomically") {
  TempDir dir;
  const std::vector<std::byte> eight(8);
  const fs::path p = dir / "w.safetensors";
  std::string msg = error_of([&] { write_safetensors(p, {{"x", DType::F32, {3}, as_span(eight)}}); });
  CHECK(contains(msg, p.string() + ": tensor 'x'"));
  CHECK(contains(msg, "needs 12"));
  msg = error_of([&] {
    write_safetensors(p, {{"x", DType::F32, {2}, as_span(eight)}, {"x", DType::I32, {2}, as_span(eight)}});
  });
  CHECK(contains(msg, "tensor 'x'"));
  CHECK(contains(msg, "duplicate"));
  CHECK(contains(error_of([&] { write_safetensors(p, {{"x", DType::U8, {-8}, as_span(eight)}}); }), "negative"));
  CHECK(!fs::exists(p));

  write_safetensors(p, {{"x", DType::F32, {2}, as_span(eight)}});
  write_safetensors(p, {{"y", DType::U8, {8}, as_span(eight)}});  // replaces the old file
  const SafetensorsFile f = SafetensorsFile::open(p);
  CHECK(f.find("x") == nullptr);
  CHECK(f.find("y") != nullptr);
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);
}

TEST_CASE("safetensors: sharded checkpoint with index round-trips") {
  TempDir dir;
  std::vector<std::vector<std::byte>> storage;
  std::vector<TensorToWrite> ts;
  for (int i = 0; i < 7; ++i) {
    storage.push_back(random_bytes(40 * static_cast<std::size_t>(i + 1), 100u + static_cast<unsigned>(i)));
    ts.push_back({"layer." + std::to_string(i) + ".weight", DType::F32, {10 * (i + 1)}, as_span(storage.back())});
  }
  storage.push_back(random_bytes(1000, 5));  // larger than a shard: gets its own
  ts.push_back({"big", DType::U8, {10, 100}, as_span(storage.back())});
  ts.push_back({"zero", DType::F16, {0}, {}});
  const fs::path ck = dir / "ckpt";
  write_sharded_checkpoint(ck, ts, 200);

  const boost::json::value index = boost::json::parse(read_raw(ck / "model.safetensors.index.json"));
  const auto& wm = index.at("weight_map").as_object();
  CHECK(wm.size() == ts.size());
  std::size_t total = 0;
  for (const auto& t : ts) total += t.bytes.size();
  CHECK(index.at("metadata").at("total_size").to_number<std::size_t>() == total);
  // greedy split in order: [40,80], [120], [160], [200], [240], [280], [1000], [0]... n shards, all listed
  std::set<std::string> shard_names;
  for (const auto& kv : wm) shard_names.insert(std::string(kv.value().as_string()));
  const std::size_t n = shard_names.size();
  CHECK(n > 2);
  char last[64];
  std::snprintf(last, sizeof last, "model-%05zu-of-%05zu.safetensors", n, n);
  CHECK(shard_names.count(last) == 1);
  CHECK(shard_names.count(std::string(wm.at("big").as_string())) == 1);
  for (const auto& kv : wm)  // "big" alone in its shard
    if (kv.key() != "big") {
      CHECK(kv.value().as_string() != wm.at("big").as_string());
    }

  const Checkpoint c = Checkpoint::open(ck);
  CHECK(c.dir() == ck);
  CHECK(c.files().size() == n);
  std::vector<std::string> expected;
  for (const auto& t : ts) expected.push_back(t.name);
  std::sort(expected.begin(), expected.end());
  CHECK(c.names() == expected);
  for (const auto& w : ts) {
    const TensorInfo& t = c.get(w.name);
    CHECK(t.shape == w.shape);
    CHECK(t.dtype == w.dtype);
    CHECK(t.file == ck / std::string(wm.at(w.name).as_string()));
    REQUIRE(t.bytes.size() == w.bytes.size());
    CHECK(std::memcmp(t.bytes.data(), w.bytes.data(), w.bytes.size()) == 0);
  }
  CHECK(c.find("nope") == nullptr);
  const std::string msg = error_of([&] { (void)c.get("model.nope"); });
  CHECK(msg == ck.string() + ": missing tensor 'model.nope'");

  // Moving the checkpoint keeps its tensor views valid.
  const std::byte* p = c.get("big").bytes.data();
  Checkpoint moved = Checkpoint::open(ck);
  const std::byte* q = moved.get("big").bytes.data();
  Checkpoint other = std::move(moved);
  CHECK(other.get("big").bytes.data() == q);
  CHECK(std::memcmp(p, q, 1000) == 0);
}

TEST_CASE("safetensors: a directory with model.safetensors, or a file path, opens as a checkpoint") {
  TempDir dir;
  const std::vector<std::byte> data = random_bytes(12, 3);
  write_safetensors(dir / "model.safetensors", {{"a", DType::I32, {3}, as_span(data)}});
  const Checkpoint c = Checkpoint::open(dir.path);
  CHECK(c.names() == std::vector<std::string>{"a"});
  CHECK(c.get("a").file == dir / "model.safetensors");
  const Checkpoint f = Checkpoint::open(dir / "model.safetensors");
  CHECK(f.get("a").numel() == 3);
  // model.safetensors beside an index: the single file wins (transformers checks for it first)
  write_sharded_checkpoint(dir.path, {{"b", DType::I32, {3}, as_span(data)}}, 1024);
  REQUIRE(fs::exists(dir / "model.safetensors.index.json"));
  CHECK(Checkpoint::open(dir.path).names() == std::vector<std::string>{"a"});
  CHECK(Checkpoint::open(dir / "model.safetensors.index.json").names() == std::vector<std::string>{"b"});
  CHECK(contains(error_of([&] { Checkpoint::open(dir / "nothing_here"); }), "nothing_here"));
  fs::create_directory(dir / "empty");
  const std::string msg = error_of([&] { Checkpoint::open(dir / "empty"); });
  CHECK(contains(msg, (dir / "empty").string()));
  CHECK(contains(msg, "model.safetensors"));
}

TEST_CASE("safetensors: HF-written fixtures open (single file and 11 shards)") {
  const fs::path models = fs::path(FPF_SOURCE_DIR) / "tests/fixtures/models";
  if (!fs::exists(models / "moe_bf16_sharded")) return;  // fixtures not checked out
  const Checkpoint sharded = Checkpoint::open(models / "moe_bf16_sharded");
  CHECK(sharded.files().size() == 11);
  const TensorInfo& lm = sharded.get("lm_head.weight");
  CHECK(lm.dtype == DType::BF16);
  CHECK(lm.shape == std::vector<std::int64_t>{256, 64});
  CHECK(lm.file.filename() == "model-00001-of-00011.safetensors");
  const boost::json::value index = boost::json::parse(read_raw(models / "moe_bf16_sharded/model.safetensors.index.json"));
  CHECK(sharded.names().size() == index.at("weight_map").as_object().size());
  std::uint64_t total = 0;
  for (const auto& n : sharded.names()) total += sharded.get(n).bytes.size();
  CHECK(total == index.at("metadata").at("total_size").to_number<std::uint64_t>());

  const Checkpoint dense = Checkpoint::open(models / "dense_tied");
  const TensorInfo& emb = dense.get("model.embed_tokens.weight");
  CHECK(emb.dtype == DType::F32);
  CHECK(emb.shape == std::vector<std::int64_t>{384, 48});
  CHECK(dense.find("lm_head.weight") == nullptr);  // tied embeddings
  CHECK(dense.files().front().metadata().at("format") == "pt");
}

TEST_CASE("safetensors: offsets past 4 GiB are read as 64-bit (sparse 5 GiB file, opened without reading it)") {
  TempDir dir;
  const fs::path p = dir / "big.safetensors";
  const std::uint64_t big = 5ull << 30;
  const std::string header = R"({"big":{"dtype":"F32","shape":[1342177280],"data_offsets":[0,)" + std::to_string(big) +
                             R"(]},"tail":{"dtype":"U8","shape":[3],"data_offsets":[)" + std::to_string(big) + ", " +
                             std::to_string(big + 3) + "]}}";
  write_raw(p, u64le(header.size()) + header);
  fs::resize_file(p, 8 + header.size() + big + 3);  // a hole: no disk blocks, reads as zeros
  const SafetensorsFile f = SafetensorsFile::open(p);
  const TensorInfo* t = f.find("big");
  REQUIRE(t != nullptr);
  CHECK(t->bytes.size() == big);
  CHECK(t->numel() == 1342177280);
  const TensorInfo* tail = f.find("tail");
  REQUIRE(tail != nullptr);
  CHECK(tail->bytes.data() == t->bytes.data() + big);
  CHECK(tail->bytes[2] == std::byte{0});  // touches one page at the far end of the mapping
}

TEST_CASE("safetensors: names that need JSON escaping, and no __metadata__ when none is given") {
  TempDir dir;
  const std::vector<std::byte> data = random_bytes(6, 11);
  const std::string odd = "model.\"quoted\"/\\ü\n";
  write_safetensors(dir / "e.safetensors", {{odd, DType::I16, {3}, as_span(data)}}, {});
  const SafetensorsFile f = SafetensorsFile::open(dir / "e.safetensors");
  REQUIRE(f.find(odd) != nullptr);
  CHECK(std::memcmp(f.find(odd)->bytes.data(), data.data(), 6) == 0);
  CHECK(f.metadata().empty());
  CHECK(!contains(read_raw(dir / "e.safetensors"), "__metadata__"));
}

// ---- bad input: one test each --------------------------------------------------------------------------------

TEST_CASE("safetensors bad input: truncated file (shorter than 8 bytes)") {
  TempDir dir;
  const fs::path p = dir / "short.safetensors";
  write_raw(p, std::string("\x10\x00\x00", 3));
  const std::string msg = error_of([&] { SafetensorsFile::open(p); });
  CHECK(contains(msg, p.string() + ":"));
  CHECK(contains(msg, "truncated"));
  write_raw(p, "");
  CHECK(contains(error_of([&] { SafetensorsFile::open(p); }), "truncated"));
}

TEST_CASE("safetensors bad input: header length past EOF") {
  TempDir dir;
  const fs::path p = dir / "cut.safetensors";
  std::string good = st_bytes(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "abcd");
  write_raw(p, good.substr(0, 20));  // cut inside the header
  const std::string msg = error_of([&] { SafetensorsFile::open(p); });
  CHECK(contains(msg, p.string() + ": header length"));
  CHECK(contains(msg, "past the end of the file"));
}

TEST_CASE("safetensors bad input: header larger than 100 MB") {
  TempDir dir;
  const fs::path p = dir / "huge.safetensors";
  write_raw(p, u64le(200'000'000) + "{}");
  const std::string msg = error_of([&] { SafetensorsFile::open(p); });
  CHECK(contains(msg, p.string() + ": header length"));
  CHECK(contains(msg, "exceeds the limit of 100000000"));
}

TEST_CASE("safetensors bad input: header not JSON, not an object, not starting with '{'") {
  TempDir dir;
  std::string msg = open_error(dir, R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]})", "x");
  CHECK(contains(msg, (dir / "bad.safetensors").string() + ": header"));
  CHECK(contains(msg, "not valid JSON"));
  msg = open_error(dir, R"([{"a": 1}])", "");
  CHECK(contains(msg, "bad.safetensors: header"));
  CHECK(contains(msg, "does not start with '{'"));
  msg = open_error(dir, R"(  {})", "");  // leading spaces are not allowed (the reference checks the first byte)
  CHECK(contains(msg, "does not start with '{'"));
  msg = open_error(dir, "", "");
  CHECK(contains(msg, "does not start with '{'"));
  msg = open_error(dir, "{} garbage", "");
  CHECK(contains(msg, "not valid JSON"));
  // right-padding with spaces is fine (that is what writers do)
  CHECK(open_error(dir, "{}      ", "") == "<no exception>");
}

TEST_CASE("safetensors bad input: entry missing dtype, shape or data_offsets") {
  TempDir dir;
  std::string msg = open_error(dir, R"({"w":{"shape":[1],"data_offsets":[0,1]}})", "x");
  CHECK(contains(msg, "bad.safetensors: header.dtype of 'w'"));
  CHECK(contains(msg, "missing"));
  msg = open_error(dir, R"({"w":{"dtype":"U8","data_offsets":[0,1]}})", "x");
  CHECK(contains(msg, "header.shape of 'w'"));
  CHECK(contains(msg, "missing"));
  msg = open_error(dir, R"({"w":{"dtype":"U8","shape":[1]}})", "x");
  CHECK(contains(msg, "header.data_offsets of 'w'"));
  CHECK(contains(msg, "missing"));
}

TEST_CASE("safetensors bad input: entry fields of the wrong JSON type") {
  TempDir dir;
  CHECK(contains(open_error(dir, R"({"w":[1,2]})", ""), "header entry 'w'"));
  CHECK(contains(open_error(dir, R"({"w":{"dtype":5,"shape":[1],"data_offsets":[0,1]}})", "x"), "header.dtype of 'w'"));
  std::string msg = open_error(dir, R"({"w":{"dtype":"U8","shape":"1","data_offsets":[0,1]}})", "x");
  CHECK(contains(msg, "header.shape of 'w'"));
  CHECK(contains(msg, "array"));
  CHECK(contains(open_error(dir, R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", "x"), "header.shape of 'w'"));
  msg = open_error(dir, R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[1]}})", "x");
  CHECK(contains(msg, "header.data_offsets of 'w'"));
  CHECK(contains(msg, "[begin, end]"));
  CHECK(contains(open_error(dir, R"({"w":{"dtype":"U8","shape":[1],"data_offsets":["0","1"]}})", "x"),
                 "header.data_offsets of 'w'"));
  msg = open_error(dir, R"({"__metadata__":{"format":1}})", "");
  CHECK(contains(msg, "header.__metadata__['format']"));
  CHECK(contains(open_error(dir, R"({"__metadata__":[]})", ""), "header.__metadata__"));
}

TEST_CASE("safetensors bad input: unknown or unsupported dtype") {
  TempDir dir;
  std::string msg = open_error(dir, R"({"w":{"dtype":"F9","shape":[1],"data_offsets":[0,1]}})", "x");
  CHECK(contains(msg, "bad.safetensors: header.dtype of 'w'"));
  CHECK(contains(msg, "unknown dtype 'F9'"));
  msg = open_error(dir, R"({"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", "x");
  CHECK(contains(msg, "unsupported dtype 'F8_E4M3'"));
  CHECK(contains(open_error(dir, R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "xxxx"), "unknown dtype"));
}

TEST_CASE("safetensors bad input: negative shape") {
  TempDir dir;
  const std::string msg = open_error(dir, R"({"w":{"dtype":"U8","shape":[2,-3],"data_offsets":[0,0]}})", "");
  CHECK(contains(msg, "bad.safetensors: header.shape of 'w'"));
  CHECK(contains(msg, "negative dimension -3 at index 1"));
}

TEST_CASE("safetensors bad input: data_offsets out of range (past the data buffer)") {
  TempDir dir;
  std::string msg = open_error(dir, R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(8, 'x'));
  CHECK(contains(msg, "bad.safetensors: header.data_offsets of 'w'"));
  CHECK(contains(msg, "out of range"));
  msg = open_error(dir, R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}})", "");
  CHECK(contains(msg, "header.data_offsets of 'w'"));
  CHECK(contains(msg, "ends before it begins"));

  // a real file cut inside its data buffer: same error, naming the tensor that no longer fits
  const std::vector<std::byte> data = random_bytes(64, 9);
  const fs::path p = dir / "cut.safetensors";
  write_safetensors(p, {{"a", DType::F32, {8}, {data.data(), 32}}, {"b", DType::F32, {8}, {data.data() + 32, 32}}});
  const std::string whole = read_raw(p);
  write_raw(p, whole.substr(0, whole.size() - 5));
  msg = error_of([&] { SafetensorsFile::open(p); });
  CHECK(contains(msg, p.string() + ": header.data_offsets of 'b'"));
  CHECK(contains(msg, "out of range"));
}

TEST_CASE("safetensors bad input: data_offsets overlapping between tensors") {
  TempDir dir;
  const std::string msg = open_error(
      dir, R"({"a":{"dtype":"U8","shape":[6],"data_offsets":[0,6]},"b":{"dtype":"U8","shape":[6],"data_offsets":[4,10]}})",
      std::string(10, 'x'));
  CHECK(contains(msg, "bad.safetensors: header.data_offsets of 'b'"));
  CHECK(contains(msg, "overlaps 'a' [0, 6]"));
  // a zero-size tensor inside another one's bytes is an overlap too (the reference rejects it)
  CHECK(contains(open_error(dir,
                            R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}})",
                            "xxxx"),
                 "overlaps 'a'"));
}

TEST_CASE("safetensors bad input: byte size disagrees with shape and dtype") {
  TempDir dir;
  const std::string msg = open_error(dir, R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}})", "12345678");
  CHECK(contains(msg, "bad.safetensors: header.data_offsets of 'w'"));
  CHECK(contains(msg, "spans 8 bytes but shape [2, 3] of BF16 needs 12"));
  // an element count that overflows is caught before any multiplication wraps around
  CHECK(contains(open_error(dir, R"({"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", ""),
                 "too large"));
}

TEST_CASE("safetensors bad input: duplicate tensor names") {
  TempDir dir;
  // boost::json::parse would silently keep the last; the reader must see both
  std::string msg = open_error(
      dir, R"({"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"w":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
      "abcd");
  CHECK(contains(msg, "bad.safetensors: header"));
  CHECK(contains(msg, "duplicate key 'w'"));
  msg = open_error(dir, R"({"w":{"dtype":"U8","dtype":"I8","shape":[2],"data_offsets":[0,2]}})", "ab");
  CHECK(contains(msg, "duplicate key 'dtype' in 'w'"));
}

TEST_CASE("safetensors bad input: holes in the data buffer") {
  TempDir dir;
  std::string msg = open_error(
      dir, R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
      "abcdef");
  CHECK(contains(msg, "bad.safetensors: header.data_offsets of 'b'"));
  CHECK(contains(msg, "hole: bytes [2, 4)"));
  msg = open_error(dir, R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})", "abcd");  // hole at the start
  CHECK(contains(msg, "hole: bytes [0, 2)"));
  msg = open_error(dir, R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "abcd");  // trailing bytes
  CHECK(contains(msg, "bad.safetensors: data buffer"));
  CHECK(contains(msg, "bytes [2, 4) after the last tensor"));
}

TEST_CASE("safetensors bad input: a file that is not a file") {
  TempDir dir;
  CHECK(contains(error_of([&] { SafetensorsFile::open(dir / "missing.safetensors"); }), "missing.safetensors: cannot open"));
  CHECK(contains(error_of([&] { SafetensorsFile::open(dir.path); }), "not a regular file"));
}

// ---- the sharding index ----------------------------------------------------------------------------------------

namespace {
// A two-shard checkpoint made by the writer, for corrupting its index.
fs::path make_sharded(const TempDir& dir, std::vector<std::vector<std::byte>>& storage) {
  storage = {random_bytes(64, 1), random_bytes(64, 2)};
  const fs::path ck = dir / "ck";
  write_sharded_checkpoint(ck, {{"a", DType::F32, {16}, as_span(storage[0])}, {"b", DType::F32, {16}, as_span(storage[1])}},
                           64);
  REQUIRE(fs::exists(ck / "model-00002-of-00002.safetensors"));
  return ck;
}
}  // namespace

TEST_CASE("safetensors index bad input: malformed index json") {
  TempDir dir;
  std::vector<std::vector<std::byte>> st;
  const fs::path ck = make_sharded(dir, st);
  const fs::path idx = ck / "model.safetensors.index.json";
  write_raw(idx, R"({"weight_map": {"a": "model-00001-of-00002.safetensors",)");
  std::string msg = error_of([&] { Checkpoint::open(ck); });
  CHECK(contains(msg, idx.string() + ": not valid JSON"));
  write_raw(idx, R"(["a"])");
  msg = error_of([&] { Checkpoint::open(ck); });
  CHECK(contains(msg, idx.string() + ": must be a JSON object"));
  write_raw(idx, R"({"weight_map": {"a": 3}})");
  msg = error_of([&] { Checkpoint::open(ck); });
  CHECK(contains(msg, idx.string() + ": weight_map['a']"));
  CHECK(contains(msg, "string"));
  write_raw(idx, R"({"weight_map": {"a": "../model-00001-of-00002.safetensors"}})");
  CHECK(contains(error_of([&] { Checkpoint::open(ck); }), "weight_map['a']"));
}

TEST_CASE("safetensors index bad input: weight_map missing") {
  TempDir dir;
  std::vector<std::vector<std::byte>> st;
  const fs::path ck = make_sharded(dir, st);
  const fs::path idx = ck / "model.safetensors.index.json";
  write_raw(idx, R"({"metadata": {"total_size": 128}})");
  std::string msg = error_of([&] { Checkpoint::open(ck); });
  CHECK(msg == idx.string() + ": weight_map: missing");
  write_raw(idx, R"({"weight_map": ["a"]})");
  CHECK(contains(error_of([&] { Checkpoint::open(ck); }), idx.string() + ": weight_map: must be an object"));
}

TEST_CASE("safetensors index bad input: a shard file missing") {
  TempDir dir;
  std::vector<std::vector<std::byte>> st;
  const fs::path ck = make_sharded(dir, st);
  fs::remove(ck / "model-00002-of-00002.safetensors");
  const std::string msg = error_of([&] { Checkpoint::open(ck); });
  CHECK(contains(msg, (ck / "model.safetensors.index.json").string() + ": weight_map['b']"));
  CHECK(contains(msg, "model-00002-of-00002.safetensors' not found"));
}

TEST_CASE("safetensors index bad input: a tensor listed in the index but absent from its shard") {
  TempDir dir;
  std::vector<std::vector<std::byte>> st;
  const fs::path ck = make_sharded(dir, st);
  const fs::path idx = ck / "model.safetensors.index.json";
  write_raw(idx, R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}})");
  const std::string msg = error_of([&] { Checkpoint::open(ck); });
  CHECK(contains(msg, idx.string() + ": weight_map['b']"));
  CHECK(contains(msg, "tensor not found in shard"));
  CHECK(contains(msg, "model-00001-of-00002.safetensors"));
}

TEST_CASE("safetensors index bad input: a corrupt shard is named by its own path") {
  TempDir dir;
  std::vector<std::vector<std::byte>> st;
  const fs::path ck = make_sharded(dir, st);
  const fs::path shard = ck / "model-00001-of-00002.safetensors";
  std::string bytes = read_raw(shard);
  write_raw(shard, bytes.substr(0, bytes.size() - 1));
  const std::string msg = error_of([&] { Checkpoint::open(ck); });
  CHECK(contains(msg, shard.string() + ": header.data_offsets of 'a'"));
}
