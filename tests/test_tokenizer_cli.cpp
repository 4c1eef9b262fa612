// fpf-tokenize, run as a program: ids as Hugging Face gives them, --decode, and exit code 2 with one clear line for
// invalid UTF-8 and a malformed tokenizer.json.
#include <fpf/text/tokenizer.hpp>

#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace {

namespace fs = std::filesystem;
const fs::path kSource = FPF_SOURCE_DIR;
const fs::path kWork = fs::path(FPF_BINARY_DIR) / "test_tokenizer_cli";

struct Result {
  int code;
  std::string out, err;
};

// A file name of this process: CTest runs test cases as parallel processes.
fs::path own_file(const std::string& name) { return kWork / (std::to_string(::getpid()) + "-" + name); }

// Runs fpf-tokenize with `args` (shell syntax), stdin, stdout and stderr through files.
Result run(const std::string& args, const std::string& stdin_text = "") {
  fs::create_directories(kWork);
  std::ofstream(own_file("stdin"), std::ios::binary) << stdin_text;
  const std::string cmd = (fs::path(FPF_BINARY_DIR) / "bin/fpf-tokenize").string() + " " + args + " <" +
                          own_file("stdin").string() + " >" + own_file("stdout").string() + " 2>" +
                          own_file("stderr").string();
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, fpf::text::detail::read_file(own_file("stdout")),
          fpf::text::detail::read_file(own_file("stderr"))};
}

const std::string kTok = "--tokenizer " + (kSource / "data/qwen3-tokenizer").string();

int lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

}  // namespace

TEST_CASE("fpf-tokenize: chat ids as Hugging Face gives them") {
  // formats.md section 5: "Hello", add_generation_prompt, enable_thinking=false.
  const auto r = run(kTok + " --text Hello --chat --no-thinking");
  CHECK(r.code == 0);
  CHECK(r.out == "{\"ids\":[151644,872,198,9707,151645,198,151644,77091,198,151667,271,151668,271]}\n");
  const auto plain = run(kTok + " --text Hello");
  CHECK(plain.out == "{\"ids\":[9707]}\n");
}

TEST_CASE("fpf-tokenize: --decode from --ids and from JSON on stdin") {
  const auto a = run(kTok + " --decode --ids 151644,872,198,9707");
  CHECK(a.code == 0);
  CHECK(a.out == "<|im_start|>user\nHello");
  const auto b = run(kTok + " --decode", "{\"ids\":[9707,1879]}");
  CHECK(b.out == "Hello world");
  const auto c = run(kTok + " --decode --ids 9707,x");
  CHECK(c.code == 2);
  CHECK(c.err.find("'x' is not a token id") != std::string::npos);
}

TEST_CASE("fpf-tokenize: a text file round-trips through --decode") {
  const auto file = kSource / "data/corpus/gzip-manual.txt";
  const auto enc = run(kTok + " --text-file " + file.string());
  REQUIRE(enc.code == 0);
  const auto dec = run(kTok + " --decode", enc.out);
  CHECK(dec.out == fpf::text::detail::read_file(file));
}

TEST_CASE("fpf-tokenize: invalid UTF-8 exits 2 with one line") {
  fs::create_directories(kWork);
  std::ofstream(own_file("bad.txt"), std::ios::binary) << "abc\xFF";
  const auto r = run(kTok + " --text-file " + own_file("bad.txt").string());
  CHECK(r.code == 2);
  CHECK(r.out.empty());
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("bad.txt: invalid UTF-8 at byte 3") != std::string::npos);
}

TEST_CASE("fpf-tokenize: a malformed tokenizer.json exits 2 with one line") {
  const auto dir = own_file("broken-tokenizer");
  fs::create_directories(dir);
  const auto good = fpf::text::detail::read_file(kSource / "data/qwen3-tokenizer/tokenizer.json");
  std::ofstream(dir / "tokenizer.json", std::ios::binary) << good.substr(0, good.size() / 3);  // truncated
  auto r = run("--tokenizer " + dir.string() + " --text hi");
  CHECK(r.code == 2);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("tokenizer.json: (document): not valid JSON") != std::string::npos);

  std::ofstream(dir / "tokenizer.json", std::ios::binary) << R"({"model": {"type": "BPE"}})";
  r = run("--tokenizer " + dir.string() + " --text hi");
  CHECK(r.code == 2);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("tokenizer.json: normalizer: missing") != std::string::npos);

  r = run("--tokenizer " + (kWork / "nowhere").string() + " --text hi");
  CHECK(r.code == 2);
  CHECK(r.err.find("cannot open file") != std::string::npos);
}

TEST_CASE("fpf-tokenize: usage errors exit 2") {
  CHECK(run(kTok).code == 2);
  CHECK(run("--text hi").code == 2);
  CHECK(run(kTok + " --text hi --no-thinking").code == 2);
  CHECK(run(kTok + " --text hi --text-file x").code == 2);
}

TEST_CASE("fpf-tokenize: the experiment prompt") {
  const auto r = run(kTok + " --text-file " + (kSource / "data/corpus/sed-manual.txt").string() +
                     " --prompt-tokens 6000 --no-thinking");
  CHECK(r.code == 0);
  CHECK(r.out.starts_with("{\"ids\":[151644,872,198,"));
  CHECK(r.out.find(",151667,271,151668,271],\"document_tokens\":6000,\"prompt_tokens\":") != std::string::npos);
}

TEST_CASE("fpf-tokenize: PDF text through poppler-cpp") {
  const auto r = run(kTok + " --text-file " + (kSource / "tests/fixtures/tokenizer/hello.pdf").string());
  if (r.code == 2 && r.err.find("poppler-cpp") != std::string::npos) {
    MESSAGE("fpf-tokenize was built without poppler-cpp; PDF reading not tested");
    return;
  }
  REQUIRE(r.code == 0);
  const auto dec = run(kTok + " --decode", r.out);
  CHECK(dec.out.find("Hello from a PDF document.") != std::string::npos);
}
