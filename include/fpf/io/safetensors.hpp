#pragma once
// safetensors reader (mmap, zero-copy, fully validated at open), sharded checkpoints through
// model.safetensors.index.json, and an atomic writer. Format: docs/formats.md section 6.
//
// File layout: u64 little-endian N | N bytes of JSON header (starts with '{', may be padded with spaces) | data.
// Header entries: "name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} with offsets relative to
// the data buffer; optional "__metadata__": string -> string. The tensors must tile the data buffer exactly: no
// overlap, no hole, nothing after the last tensor (the reference reader rejects all three, and so do we).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/json.hpp>

#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>
#include <fpf/io/json_util.hpp>
#include <fpf/io/mmap.hpp>

namespace fpf::io {

// The reference reader refuses larger headers (a guard against absurd lengths read from corrupt files).
inline constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;
inline constexpr std::string_view kIndexFileName = "model.safetensors.index.json";
inline constexpr std::string_view kSingleFileName = "model.safetensors";

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;  // points into the mmap, valid while the file object lives
  std::filesystem::path file;        // the shard it lives in

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;  // validated at open: fits in int64
    return n;
  }
};

namespace detail {

inline std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// numel * element size in bytes, or nullopt when either overflows (then no real file can hold the tensor).
inline std::optional<std::uint64_t> checked_nbytes(const std::vector<std::int64_t>& shape, DType dtype) {
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  std::uint64_t n = 1;
  for (std::int64_t d : shape)
    if (__builtin_mul_overflow(n, static_cast<std::uint64_t>(d), &n)) return std::nullopt;
  if (n > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return std::nullopt;
  std::uint64_t bytes = 0;
  if (__builtin_mul_overflow(n, static_cast<std::uint64_t>(dtype_size(dtype)), &bytes)) return std::nullopt;
  return bytes;
}

// dtype names the safetensors format defines but fpf does not read; lets the error say "unsupported", not "unknown".
inline bool is_safetensors_dtype_fpf_lacks(std::string_view s) {
  for (std::string_view k : {"F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "U16", "U32", "U64", "C64"})
    if (k == s) return true;
  return false;
}

inline std::string range_str(std::uint64_t begin, std::uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// A non-negative integer that fits in int64, or nullopt (negative, fractional, too large, not a number).
inline std::optional<std::int64_t> as_nonneg_int(const boost::json::value& v) {
  if (v.is_int64()) return v.get_int64() >= 0 ? std::optional<std::int64_t>(v.get_int64()) : std::nullopt;
  if (v.is_uint64() && v.get_uint64() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
    return static_cast<std::int64_t>(v.get_uint64());
  return std::nullopt;
}

}  // namespace detail

// One .safetensors file, mmap'ed read-only. Movable, not copyable; TensorInfo::bytes stay valid across moves.
// (As with any mmap, truncating the file on disk while it is open makes later reads of the cut pages fault.)
class SafetensorsFile {
 public:
  // Maps the file and validates the whole header against the file size. Throws fpf::Error naming the file and
  // the field (and tensor) at fault. Reads no tensor data.
  static SafetensorsFile open(const std::filesystem::path& path) {
    SafetensorsFile f;
    f.path_ = path;
    f.map_ = MappedFile::open(path);
    f.parse_header();
    return f;
  }

  const TensorInfo* find(std::string_view name) const {
    auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &tensors_[it->second];
  }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in data-offset order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::filesystem::path& path() const { return path_; }
  std::size_t file_size() const { return map_.size(); }
  std::size_t header_size() const { return header_size_; }          // N, padding included
  std::size_t data_offset() const { return 8 + header_size_; }      // file offset of the data buffer

 private:
  void parse_header() {
    const std::string file = path_.string();
    const std::span<const std::byte> all = map_.bytes();
    if (all.size() < 8)
      throw Error(file, "truncated: " + std::to_string(all.size()) +
                            " bytes, shorter than the 8-byte header length that starts every safetensors file");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint64_t>(all[static_cast<std::size_t>(i)]);
    const std::string where_len = file + ": header length";
    if (n > kMaxSafetensorsHeaderBytes)
      throw Error(where_len, std::to_string(n) + " bytes exceeds the limit of " +
                                 std::to_string(kMaxSafetensorsHeaderBytes) + " (corrupt or not a safetensors file)");
    if (n > all.size() - 8)
      throw Error(where_len, std::to_string(n) + " bytes runs past the end of the file (" +
                                 std::to_string(all.size()) + " bytes; truncated?)");
    header_size_ = static_cast<std::size_t>(n);
    const std::string_view text(reinterpret_cast<const char*>(all.data() + 8), header_size_);
    const std::string where_hdr = file + ": header";
    if (text.empty() || text.front() != '{') throw Error(where_hdr, "does not start with '{' (not a safetensors file?)");
    const boost::json::value root = json::parse(text, where_hdr);
    if (!root.is_object()) throw Error(where_hdr, "must be a JSON object, got " + json::kind_name(root));
    if (const json::DuplicateKey dup = json::find_duplicate_key(text))
      throw Error(where_hdr, "duplicate key '" + dup.key + "'" + (dup.parent.empty() ? "" : " in '" + dup.parent + "'"));

    const std::uint64_t buffer_len = all.size() - 8 - n;
    const std::byte* buffer = all.data() + 8 + n;
    struct Range {
      std::uint64_t begin, end;
    };
    std::vector<Range> ranges;
    for (const auto& kv : root.as_object()) {
      const std::string name(kv.key());
      if (name == "__metadata__") {
        parse_metadata(kv.value(), file);
        continue;
      }
      const auto where = [&](std::string_view field) {
        return file + ": header." + std::string(field) + " of '" + name + "'";
      };
      if (!kv.value().is_object())
        throw Error(file + ": header entry '" + name + "'",
                    "must be an object with dtype, shape and data_offsets, got " + json::kind_name(kv.value()));
      const boost::json::object& e = kv.value().get_object();

      TensorInfo t;
      t.name = name;
      t.file = path_;
      // dtype
      const boost::json::value* dv = e.if_contains("dtype");
      if (dv == nullptr) throw Error(where("dtype"), "missing");
      if (!dv->is_string()) throw Error(where("dtype"), "must be a string, got " + json::brief(*dv));
      const std::string_view ds(dv->get_string().data(), dv->get_string().size());
      const std::optional<DType> dt = parse_dtype(ds);
      if (!dt)
        throw Error(where("dtype"), (detail::is_safetensors_dtype_fpf_lacks(ds) ? "unsupported dtype '" : "unknown dtype '") +
                                        std::string(ds) + "' (fpf reads BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64)");
      t.dtype = *dt;
      // shape
      const boost::json::value* sv = e.if_contains("shape");
      if (sv == nullptr) throw Error(where("shape"), "missing");
      if (!sv->is_array()) throw Error(where("shape"), "must be an array of integers, got " + json::brief(*sv));
      for (std::size_t i = 0; i < sv->get_array().size(); ++i) {
        const boost::json::value& d = sv->get_array()[i];
        const std::optional<std::int64_t> di = detail::as_nonneg_int(d);
        if (!di)
          throw Error(where("shape"), (d.is_int64() ? "negative dimension " : "dimension must be a non-negative integer, got ") +
                                          json::brief(d) + " at index " + std::to_string(i));
        t.shape.push_back(*di);
      }
      // data_offsets
      const boost::json::value* ov = e.if_contains("data_offsets");
      if (ov == nullptr) throw Error(where("data_offsets"), "missing");
      if (!ov->is_array() || ov->get_array().size() != 2)
        throw Error(where("data_offsets"), "must be an array [begin, end] of two integers, got " + json::brief(*ov));
      const std::optional<std::int64_t> b = detail::as_nonneg_int(ov->get_array()[0]);
      const std::optional<std::int64_t> en = detail::as_nonneg_int(ov->get_array()[1]);
      if (!b || !en) throw Error(where("data_offsets"), "must be two non-negative integers, got " + json::brief(*ov));
      const Range r{static_cast<std::uint64_t>(*b), static_cast<std::uint64_t>(*en)};
      const auto offs = [&] { return detail::range_str(r.begin, r.end); };  // built only for a message
      if (r.end < r.begin) throw Error(where("data_offsets"), offs() + " ends before it begins");
      if (r.end > buffer_len)
        throw Error(where("data_offsets"), offs() + " out of range: past the end of the data buffer (" +
                                               std::to_string(buffer_len) + " bytes; truncated file?)");
      const std::optional<std::uint64_t> need = detail::checked_nbytes(t.shape, t.dtype);
      if (!need) throw Error(where("shape"), detail::shape_str(t.shape) + " is too large (element count overflows)");
      if (*need != r.end - r.begin)
        throw Error(where("data_offsets"), offs() + " spans " + std::to_string(r.end - r.begin) + " bytes but shape " +
                                               detail::shape_str(t.shape) + " of " + std::string(dtype_name(t.dtype)) +
                                               " needs " + std::to_string(*need));
      t.bytes = {buffer + r.begin, static_cast<std::size_t>(r.end - r.begin)};
      tensors_.push_back(std::move(t));
      ranges.push_back(r);
    }

    // Tile check in data-offset order (ties: zero-size tensors may sit at the same offset).
    std::vector<std::size_t> order(tensors_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      if (ranges[a].begin != ranges[b].begin) return ranges[a].begin < ranges[b].begin;
      if (ranges[a].end != ranges[b].end) return ranges[a].end < ranges[b].end;
      return tensors_[a].name < tensors_[b].name;
    });
    std::uint64_t cursor = 0;
    const TensorInfo* prev = nullptr;
    Range prev_r{0, 0};
    for (std::size_t i : order) {
      const Range r = ranges[i];
      const auto where = [&] { return file + ": header.data_offsets of '" + tensors_[i].name + "'"; };
      if (r.begin < cursor)
        throw Error(where(), detail::range_str(r.begin, r.end) + " overlaps '" + prev->name + "' " +
                                 detail::range_str(prev_r.begin, prev_r.end));
      if (r.begin > cursor)
        throw Error(where(), detail::range_str(r.begin, r.end) + " leaves a hole: bytes [" + std::to_string(cursor) +
                                 ", " + std::to_string(r.begin) + ") of the data buffer belong to no tensor");
      cursor = r.end;
      prev = &tensors_[i];
      prev_r = r;
    }
    if (cursor != buffer_len)
      throw Error(file + ": data buffer", "bytes [" + std::to_string(cursor) + ", " + std::to_string(buffer_len) +
                                              ") after the last tensor belong to no tensor");

    std::vector<TensorInfo> sorted;
    sorted.reserve(tensors_.size());
    for (std::size_t i : order) sorted.push_back(std::move(tensors_[i]));
    tensors_ = std::move(sorted);
    for (std::size_t i = 0; i < tensors_.size(); ++i) by_name_.emplace(tensors_[i].name, i);
  }

  void parse_metadata(const boost::json::value& v, const std::string& file) {
    const std::string where = file + ": header.__metadata__";
    if (!v.is_object()) throw Error(where, "must be an object of strings, got " + json::kind_name(v));
    for (const auto& kv : v.get_object()) {
      if (!kv.value().is_string())
        throw Error(where + "['" + std::string(kv.key()) + "']", "must be a string, got " + json::brief(kv.value()));
      metadata_.emplace(std::string(kv.key()), std::string(kv.value().get_string()));
    }
  }

  std::filesystem::path path_;
  MappedFile map_;
  std::size_t header_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> by_name_;
  std::map<std::string, std::string> metadata_;
};

// A model directory: model.safetensors, or shards listed by model.safetensors.index.json. When both exist the single
// file wins, as in transformers' from_pretrained. Also accepts the path of a .safetensors file or of the index.
class Checkpoint {
 public:
  static Checkpoint open(const std::filesystem::path& dir_or_file) {
    namespace fs = std::filesystem;
    Checkpoint c;
    std::error_code ec;
    if (fs::is_regular_file(dir_or_file, ec)) {
      c.dir_ = dir_or_file.parent_path();
      if (dir_or_file.extension() == ".json") c.open_index(dir_or_file);
      else c.open_single(dir_or_file);
      return c;
    }
    c.dir_ = dir_or_file;
    if (!fs::is_directory(dir_or_file, ec)) throw Error(dir_or_file.string(), "no such model directory");
    const fs::path index = dir_or_file / kIndexFileName;
    const fs::path single = dir_or_file / kSingleFileName;
    if (fs::exists(single, ec)) c.open_single(single);
    else if (fs::exists(index, ec)) c.open_index(index);
    else throw Error(dir_or_file.string(), "no " + std::string(kSingleFileName) + " or " + std::string(kIndexFileName));
    return c;
  }

  const TensorInfo* find(std::string_view name) const {
    auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : it->second;
  }
  const TensorInfo& get(std::string_view name) const {
    if (const TensorInfo* t = find(name)) return *t;
    throw Error(dir_.string(), "missing tensor '" + std::string(name) + "'");
  }
  std::vector<std::string> names() const {  // sorted (std::map order)
    std::vector<std::string> out;
    out.reserve(by_name_.size());
    for (const auto& kv : by_name_) out.push_back(kv.first);
    return out;
  }
  const std::filesystem::path& dir() const { return dir_; }
  const std::vector<SafetensorsFile>& files() const { return files_; }

 private:
  void open_single(const std::filesystem::path& file) {
    files_.push_back(SafetensorsFile::open(file));
    for (const TensorInfo& t : files_.back().tensors()) by_name_.emplace(t.name, &t);
  }

  // The index is authoritative: exactly its weight_map names are visible, each from the shard it names.
  void open_index(const std::filesystem::path& index) {
    namespace fs = std::filesystem;
    const std::string where = index.string();
    const boost::json::value root = json::parse(json::read_text_file(index), where);
    if (!root.is_object()) throw Error(where, "must be a JSON object, got " + json::kind_name(root));
    const boost::json::value* wm = root.get_object().if_contains("weight_map");
    if (wm == nullptr) throw Error(where + ": weight_map", "missing");
    if (!wm->is_object())
      throw Error(where + ": weight_map", "must be an object of tensor name -> shard file, got " + json::kind_name(*wm));

    std::map<std::string, std::size_t> shard_index;  // shard file name -> position in files_
    std::vector<std::pair<std::string, std::string>> entries;
    for (const auto& kv : wm->get_object()) {
      const std::string name(kv.key());
      const std::string where_e = where + ": weight_map['" + name + "']";
      if (!kv.value().is_string()) throw Error(where_e, "must be a shard file name (string), got " + json::brief(kv.value()));
      const std::string shard(kv.value().get_string());
      const fs::path rel(shard);
      // Shards live beside the index; refuse names that escape the directory.
      if (shard.empty() || rel.is_absolute() || std::find(rel.begin(), rel.end(), fs::path("..")) != rel.end())
        throw Error(where_e, "shard file '" + shard + "' must be a file name inside " + index.parent_path().string());
      if (!shard_index.count(shard)) {
        const fs::path p = index.parent_path() / rel;
        std::error_code ec;
        if (!fs::is_regular_file(p, ec)) throw Error(where_e, "shard file '" + p.string() + "' not found");
        shard_index.emplace(shard, 0);
      }
      entries.emplace_back(name, shard);
    }
    files_.reserve(shard_index.size());  // open in file-name order (deterministic, like transformers)
    for (auto& [shard, pos] : shard_index) {
      pos = files_.size();
      files_.push_back(SafetensorsFile::open(index.parent_path() / shard));
    }
    for (const auto& [name, shard] : entries) {
      const SafetensorsFile& f = files_[shard_index.at(shard)];
      const TensorInfo* t = f.find(name);
      if (t == nullptr)
        throw Error(where + ": weight_map['" + name + "']", "tensor not found in shard " + f.path().string());
      by_name_.emplace(name, t);
    }
  }

  std::filesystem::path dir_;
  std::vector<SafetensorsFile> files_;  // TensorInfo pointers below stay valid when this vector moves
  std::map<std::string, const TensorInfo*, std::less<>> by_name_;
};

// ---------------------------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------------------------
struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;
};

namespace detail {

// Writes the concatenation of parts to path atomically: a temp file in the same directory, fsync, rename. A reader
// sees either the old file or the complete new one, never a partial write.
inline void write_file_atomically(const std::filesystem::path& path, const std::vector<std::span<const std::byte>>& parts) {
  static std::atomic<unsigned> counter{0};
  const std::filesystem::path tmp =
      path.parent_path() / ("." + path.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" +
                            std::to_string(counter.fetch_add(1)));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(path.string(), std::string("cannot create temp file: ") + std::strerror(errno));
  auto fail = [&](const char* what) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    throw Error(path.string(), std::string(what) + std::strerror(err));
  };
  for (std::span<const std::byte> part : parts) {
    const std::byte* p = part.data();
    std::size_t left = part.size();
    while (left > 0) {  // write() may be partial (and caps at ~2 GiB per call on Linux)
      const ssize_t w = ::write(fd, p, left);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("cannot write: ");
      }
      p += w;
      left -= static_cast<std::size_t>(w);
    }
  }
  if (::fsync(fd) != 0) fail("cannot fsync: ");
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw Error(path.string(), std::string("cannot close: ") + std::strerror(err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw Error(path.string(), std::string("cannot rename temp file into place: ") + std::strerror(err));
  }
}

inline void check_tensor_to_write(const std::string& where_file, const TensorToWrite& t) {
  const std::string where = where_file + ": tensor '" + t.name + "'";
  if (t.name.empty() || t.name == "__metadata__") throw Error(where, "invalid tensor name");
  for (std::int64_t d : t.shape)
    if (d < 0) throw Error(where, "negative dimension in shape " + shape_str(t.shape));
  const std::optional<std::uint64_t> need = checked_nbytes(t.shape, t.dtype);
  if (!need || *need != t.bytes.size())
    throw Error(where, "has " + std::to_string(t.bytes.size()) + " bytes but shape " + shape_str(t.shape) + " of " +
                           std::string(dtype_name(t.dtype)) + " needs " + (need ? std::to_string(*need) : "too many"));
}

}  // namespace detail

// Writes one safetensors file atomically. Data order: larger element types first, then by name (as the reference
// writer does), so every tensor is aligned to its element size; the header is space-padded so 8+N % 8 == 0.
inline void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  const std::string file = path.string();
  std::set<std::string_view> seen;
  for (const TensorToWrite& t : tensors) {
    detail::check_tensor_to_write(file, t);
    if (!seen.insert(t.name).second) throw Error(file + ": tensor '" + t.name + "'", "duplicate name");
  }
  std::vector<const TensorToWrite*> order;
  for (const TensorToWrite& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    if (dtype_size(a->dtype) != dtype_size(b->dtype)) return dtype_size(a->dtype) > dtype_size(b->dtype);
    return a->name < b->name;
  });

  boost::json::object header;  // keeps insertion order: __metadata__, then tensors in data order
  if (!metadata.empty()) {
    boost::json::object m;
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  std::uint64_t offset = 0;
  std::vector<std::span<const std::byte>> parts;
  parts.emplace_back();  // length + header, filled below
  for (const TensorToWrite* t : order) {
    boost::json::array shape;
    for (std::int64_t d : t->shape) shape.emplace_back(d);
    boost::json::object e;
    e["dtype"] = std::string(dtype_name(t->dtype));
    e["shape"] = std::move(shape);
    e["data_offsets"] = boost::json::array{offset, offset + t->bytes.size()};
    header[t->name] = std::move(e);
    offset += t->bytes.size();
    parts.push_back(t->bytes);
  }
  std::string text = boost::json::serialize(header);
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');
  std::string head(8, '\0');
  for (int i = 0; i < 8; ++i) head[static_cast<std::size_t>(i)] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  head += text;
  parts[0] = std::as_bytes(std::span<const char>(head.data(), head.size()));
  detail::write_file_atomically(path, parts);
}

// Splits tensors (in the given order) into shards of at most max_shard_bytes of tensor data, like huggingface_hub:
// a tensor that would tip the current shard over starts a new one, a tensor larger than the limit gets a shard of its
// own. Writes model-0000k-of-0000n.safetensors (always, even for n = 1), then model.safetensors.index.json last.
inline void write_sharded_checkpoint(const std::filesystem::path& dir, const std::vector<TensorToWrite>& tensors,
                                     std::size_t max_shard_bytes) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw Error(dir.string(), "cannot create directory: " + ec.message());
  std::set<std::string_view> seen;
  for (const TensorToWrite& t : tensors)
    if (!seen.insert(t.name).second) throw Error(dir.string() + ": tensor '" + t.name + "'", "duplicate name");

  std::vector<std::vector<TensorToWrite>> shards;
  std::vector<TensorToWrite> current;
  std::size_t current_bytes = 0, total_bytes = 0;
  for (const TensorToWrite& t : tensors) {
    total_bytes += t.bytes.size();
    if (t.bytes.size() > max_shard_bytes) {
      shards.push_back({t});
      continue;
    }
    if (!current.empty() && current_bytes + t.bytes.size() > max_shard_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(t);
    current_bytes += t.bytes.size();
  }
  if (!current.empty() || shards.empty()) shards.push_back(std::move(current));

  boost::json::object weight_map;
  std::map<std::string, std::string> sorted_map;  // the index lists names sorted, like transformers
  const std::size_t n = shards.size();
  for (std::size_t k = 0; k < n; ++k) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k + 1, n);
    write_safetensors(dir / name, shards[k]);
    for (const TensorToWrite& t : shards[k]) sorted_map.emplace(t.name, name);
  }
  for (const auto& [t, f] : sorted_map) weight_map[t] = f;
  boost::json::object index;
  index["metadata"] = boost::json::object{{"total_size", total_bytes}};
  index["weight_map"] = std::move(weight_map);
  const std::string text = boost::json::serialize(index) + "\n";
  detail::write_file_atomically(dir / kIndexFileName, {std::as_bytes(std::span<const char>(text.data(), text.size()))});
}

// write_sharded_checkpoint's output, written tensor by tensor: add() copies a tensor into the shard being filled and
// writes a shard as soon as it is complete, so only one shard's bytes are held (fpf-synth --quant on the real shape:
// ~16 GB of quantized tensors produced batch by batch). Same split rule, order and bytes as write_sharded_checkpoint
// given the same tensors in the same order. Shards are written under temporary names and renamed to
// model-0000k-of-0000n.safetensors by finish() (n is known only then), which writes the index last; a writer
// destroyed without finish() removes its temporary shards.
class ShardedCheckpointWriter {
 public:
  ShardedCheckpointWriter(std::filesystem::path dir, std::size_t max_shard_bytes)
      : dir_(std::move(dir)), max_(max_shard_bytes) {
    std::error_code ec;
    std::filesystem::create_directories(dir_, ec);
    if (ec) throw Error(dir_.string(), "cannot create directory: " + ec.message());
  }
  ShardedCheckpointWriter(const ShardedCheckpointWriter&) = delete;
  ShardedCheckpointWriter& operator=(const ShardedCheckpointWriter&) = delete;
  ~ShardedCheckpointWriter() {
    std::error_code ec;
    for (const Shard& s : written_) std::filesystem::remove(dir_ / s.temp_name, ec);
  }

  void add(const TensorToWrite& t) {
    if (finished_) throw Error(dir_.string(), "tensor '" + t.name + "' added after finish()");
    if (!names_.insert(t.name).second) throw Error(dir_.string() + ": tensor '" + t.name + "'", "duplicate name");
    total_bytes_ += t.bytes.size();
    if (t.bytes.size() > max_) {  // a shard of its own, before the one being filled (as write_sharded_checkpoint)
      Pending own;
      own.put(t);
      write(own);
      return;
    }
    if (!current_.tensors.empty() && current_bytes_ + t.bytes.size() > max_) {
      write(current_);
      current_ = Pending{};
      current_bytes_ = 0;
    }
    current_.put(t);
    current_bytes_ += t.bytes.size();
  }

  void finish() {
    if (finished_) return;
    if (!current_.tensors.empty() || written_.empty()) write(current_);
    current_ = Pending{};
    const std::size_t n = written_.size();
    std::map<std::string, std::string> sorted_map;  // the index lists names sorted, like transformers
    for (std::size_t k = 0; k < n; ++k) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k + 1, n);
      std::error_code ec;
      std::filesystem::rename(dir_ / written_[k].temp_name, dir_ / name, ec);
      if (ec) throw Error((dir_ / name).string(), "cannot rename the written shard into place: " + ec.message());
      written_[k].temp_name.clear();
      for (const std::string& t : written_[k].names) sorted_map.emplace(t, name);
    }
    written_.clear();
    boost::json::object weight_map;
    for (const auto& [t, f] : sorted_map) weight_map[t] = f;
    boost::json::object index;
    index["metadata"] = boost::json::object{{"total_size", total_bytes_}};
    index["weight_map"] = std::move(weight_map);
    const std::string text = boost::json::serialize(index) + "\n";
    detail::write_file_atomically(dir_ / kIndexFileName, {std::as_bytes(std::span<const char>(text.data(), text.size()))});
    finished_ = true;
  }

 private:
  struct Pending {
    std::deque<std::vector<std::byte>> bytes;  // owned copies: the caller's buffers may go away after add()
    std::vector<TensorToWrite> tensors;
    void put(const TensorToWrite& t) {
      std::vector<std::byte>& b = bytes.emplace_back(t.bytes.begin(), t.bytes.end());
      tensors.push_back({t.name, t.dtype, t.shape, std::span<const std::byte>(b)});
    }
  };
  struct Shard {
    std::string temp_name;
    std::vector<std::string> names;
  };
  void write(const Pending& p) {
    Shard s{".model-shard-" + std::to_string(written_.size() + 1) + ".safetensors.partial", {}};
    write_safetensors(dir_ / s.temp_name, p.tensors);
    for (const TensorToWrite& t : p.tensors) s.names.push_back(t.name);
    written_.push_back(std::move(s));
  }

  std::filesystem::path dir_;
  std::size_t max_;
  Pending current_;
  std::size_t current_bytes_ = 0, total_bytes_ = 0;
  std::vector<Shard> written_;
  std::set<std::string> names_;
  bool finished_ = false;
};

}  // namespace fpf::io
