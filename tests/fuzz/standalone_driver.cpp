// Runs a libFuzzer-style target without libFuzzer (GCC builds): each seed file once, then random mutations of the
// seeds for a bounded time. Deterministic for a given --rng-seed, so a failure reproduces.
//   fpf_fuzz_tokenizer [--seconds N] [--rng-seed S] SEED_FILE_OR_DIR...
// A failing input is written to ./fuzz-crash-input before the target aborts (the target prints what failed).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

// Fragments that matter to the tokenizer: added tokens, whitespace of every kind, combining marks, multi-byte and
// broken UTF-8, contractions, digits.
const std::vector<std::string> kDictionary = {
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "<|", "|>", "<",
    " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\xC2\xA0", "\xE3\x80\x80", "\xE1\xA0\x8E", "\xC2\x85",
    "\xE2\x80\xA8", "\xCC\x81", "\xCC\xB8", "\xE3\x82\x99", "e\xCC\x81", "'s", "'LL", "'\xC5\xBF", "123", "\xD9\xA3",
    "\xE4\xB8\xAD", "\xF0\x9F\x98\x80", "\xE2\x80\x8D", "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9", "\xEF\xB8\x8F",
    "\xC3", "\xE6\x97", "\xF0\x9F\x98", "\xFF", "\x80", "\xED\xA0\x80", "\xEF\xBF\xBD", "\xEA\xB0\x80", "\xE1\x84\x80"};

std::string mutate(std::string s, const std::vector<std::string>& seeds, std::mt19937_64& rng) {
  const auto pick = [&](std::size_t n) { return n ? static_cast<std::size_t>(rng() % n) : 0; };
  const int steps = 1 + static_cast<int>(rng() % 4);
  for (int k = 0; k < steps; ++k) {
    switch (rng() % 6) {
      case 0:  // insert a dictionary fragment
        s.insert(pick(s.size() + 1), kDictionary[pick(kDictionary.size())]);
        break;
      case 1:  // insert random bytes
        for (int n = 1 + static_cast<int>(rng() % 4); n > 0; --n)
          s.insert(s.begin() + static_cast<std::ptrdiff_t>(pick(s.size() + 1)), static_cast<char>(rng()));
        break;
      case 2:  // erase a range
        if (!s.empty()) {
          const auto at = pick(s.size());
          s.erase(at, 1 + pick(std::min<std::size_t>(16, s.size() - at)));
        }
        break;
      case 3:  // flip a byte
        if (!s.empty()) s[pick(s.size())] ^= static_cast<char>(1u << (rng() % 8));
        break;
      case 4: {  // splice in part of another seed
        const auto& other = seeds[pick(seeds.size())];
        if (!other.empty()) {
          const auto from = pick(other.size());
          s.insert(pick(s.size() + 1), other.substr(from, 1 + pick(std::min<std::size_t>(64, other.size() - from))));
        }
        break;
      }
      default:  // repeat a slice (long runs)
        if (!s.empty()) {
          const auto from = pick(s.size());
          const std::string slice = s.substr(from, 1 + pick(std::min<std::size_t>(8, s.size() - from)));
          for (int n = static_cast<int>(rng() % 64); n > 0; --n) s.insert(from, slice);
        }
    }
  }
  if (s.size() > 8192) s.resize(8192);
  return s;
}

void run_one(const std::string& input) {
  std::ofstream(std::filesystem::path("fuzz-crash-input"), std::ios::binary) << input;
  LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(input.data()), input.size());
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 10;
  std::uint64_t rng_seed = 20261123;
  std::vector<std::string> seeds;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--seconds" && i + 1 < argc) {
      seconds = std::stod(argv[++i]);
    } else if (arg == "--rng-seed" && i + 1 < argc) {
      rng_seed = std::stoull(argv[++i]);
    } else {
      std::vector<std::filesystem::path> files;
      if (std::filesystem::is_directory(arg)) {
        for (const auto& e : std::filesystem::directory_iterator(arg)) files.push_back(e.path());
        std::sort(files.begin(), files.end());
      } else {
        files.push_back(arg);
      }
      for (const auto& f : files) {
        std::ifstream in(f, std::ios::binary);
        if (!in) {
          std::fprintf(stderr, "fpf_fuzz_tokenizer: cannot read %s\n", f.string().c_str());
          return 2;
        }
        seeds.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      }
    }
  }
  seeds.push_back("");
  for (const auto& s : seeds) run_one(s);

  std::mt19937_64 rng(rng_seed);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::size_t runs = seeds.size();
  std::vector<std::string> pool = seeds;  // grows with some mutants, so mutations compound
  while (std::chrono::steady_clock::now() < deadline) {
    std::string input = mutate(pool[rng() % pool.size()], seeds, rng);
    run_one(input);
    ++runs;
    if (rng() % 8 == 0 && pool.size() < 4096) pool.push_back(std::move(input));
  }
  std::filesystem::remove("fuzz-crash-input");
  std::printf("fpf_fuzz_tokenizer: %zu inputs in %.0f s, no failure\n", runs, seconds);
  return 0;
}
