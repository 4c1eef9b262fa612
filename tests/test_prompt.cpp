// Prompt builder: exactly N document tokens inside Qwen3's chat template, batch neighbours from different
// documents, the default corpus, and document loading.
#include <fpf/text/prompt.hpp>

#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using fpf::text::TokenId;
const fs::path kSource = FPF_SOURCE_DIR;

const fpf::text::Tokenizer& qwen3() {
  static const auto tok = fpf::text::Tokenizer::from_dir(fpf::text::default_tokenizer_dir());
  return tok;
}

// Ids of the template's pieces, as Hugging Face tokenizes them (formats.md section 5).
const std::vector<TokenId> kUserHeader = {151644, 872, 198};                      // <|im_start|>user\n
const std::vector<TokenId> kTurnEnd = {151645, 198, 151644, 77091, 198};         // <|im_end|>\n<|im_start|>assistant\n
const std::vector<TokenId> kEmptyThinking = {151667, 271, 151668, 271};          // <think>\n\n</think>\n\n

bool starts_with(const std::vector<TokenId>& v, const std::vector<TokenId>& prefix) {
  return v.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), v.begin());
}
bool ends_with(const std::vector<TokenId>& v, const std::vector<TokenId>& suffix) {
  return v.size() >= suffix.size() && std::equal(suffix.rbegin(), suffix.rend(), v.rbegin());
}

}  // namespace

TEST_CASE("prompt: the default corpus has at least 4 distinct documents of at least 8k tokens") {
  CHECK(fpf::text::default_corpus_dir() == kSource / "data/corpus");
  const auto docs = fpf::text::load_corpus(fpf::text::default_corpus_dir());
  CHECK(docs.size() >= 4);
  std::set<std::string> texts;
  for (const auto& d : docs) {
    INFO(d.name);
    texts.insert(d.text);
    CHECK(qwen3().encode(d.text).size() >= 8000);
  }
  CHECK(texts.size() == docs.size());
}

TEST_CASE("prompt: exactly N document tokens between the chat template's pieces") {
  const auto docs = fpf::text::load_corpus(fpf::text::default_corpus_dir());
  for (const bool thinking_off : {false, true}) {
    fpf::text::PromptSpec spec;
    spec.document_tokens = 6000;
    if (thinking_off) spec.enable_thinking = false;
    const auto p = fpf::text::build_prompt(qwen3(), docs[0], spec);
    CHECK(p.document == docs[0].name);
    CHECK(p.document_end - p.document_begin == 6000);
    CHECK(p.document_begin == kUserHeader.size());
    CHECK(starts_with(p.ids, kUserHeader));
    // The document's tokens are its first N tokens as a whole-document encoding gives them.
    const auto doc_ids = qwen3().encode(docs[0].text);
    CHECK(std::equal(p.ids.begin() + static_cast<std::ptrdiff_t>(p.document_begin),
                     p.ids.begin() + static_cast<std::ptrdiff_t>(p.document_end), doc_ids.begin()));
    // After them: the request, then the end of the turn and the generation prompt.
    const auto request = qwen3().encode(spec.separator + spec.request);
    CHECK(std::equal(request.begin(), request.end(), p.ids.begin() + static_cast<std::ptrdiff_t>(p.document_end)));
    auto tail = kTurnEnd;
    if (thinking_off) tail.insert(tail.end(), kEmptyThinking.begin(), kEmptyThinking.end());
    CHECK(ends_with(p.ids, tail));
    CHECK(p.length() == kUserHeader.size() + 6000 + request.size() + tail.size());
    CHECK(p.text == qwen3().decode(p.ids));
    CHECK(p.text.find("Provide a summary of the text above.<|im_end|>") != std::string::npos);
  }
}

TEST_CASE("prompt: batch neighbours come from different documents and have one length") {
  const auto docs = fpf::text::load_corpus(fpf::text::default_corpus_dir());
  fpf::text::PromptSpec spec;
  spec.document_tokens = 6000;
  spec.system = "You are a careful assistant.";
  const auto batch = fpf::text::build_batch(qwen3(), docs, spec, 4);
  REQUIRE(batch.size() == 4);
  std::set<std::string> names;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const auto& p = batch[i];
    names.insert(p.document);
    if (i > 0) CHECK(p.ids != batch[0].ids);
    CHECK(p.document_end - p.document_begin == 6000);
    CHECK(p.length() == batch[0].length());
    CHECK(p.text.starts_with("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\n"));
  }
  CHECK(names.size() == 4);

  CHECK_THROWS_WITH(fpf::text::build_batch(qwen3(), std::span(docs).first(2), spec, 4),
                    doctest::Contains("batch size 4 needs as many documents"));
  const std::vector<fpf::text::Document> twins = {docs[0], {"copy", docs[0].text}};
  CHECK_THROWS_WITH(fpf::text::build_batch(qwen3(), twins, spec, 2), doctest::Contains("are the same document"));
}

TEST_CASE("prompt: a document shorter than N tokens is an error") {
  fpf::text::PromptSpec spec;
  spec.document_tokens = 50;
  CHECK_THROWS_WITH(fpf::text::build_prompt(qwen3(), {"short.txt", "Only a few words."}, spec),
                    doctest::Contains("short.txt: has 5 tokens; the prompt needs 50"));
}

TEST_CASE("prompt: documents are UTF-8 text files or PDFs") {
  const fs::path dir = fs::path(FPF_BINARY_DIR) / "test_prompt";
  fs::create_directories(dir);
  std::ofstream(dir / "bad.txt", std::ios::binary) << "fine text \xC3\x28 broken";
  CHECK_THROWS_WITH(fpf::text::load_document(dir / "bad.txt"), doctest::Contains("invalid UTF-8 at byte 10"));
  CHECK_THROWS_WITH(fpf::text::load_corpus(dir / "none"), doctest::Contains("not a folder"));
  const auto pdf = kSource / "tests/fixtures/tokenizer/hello.pdf";
#if defined(FPF_HAVE_POPPLER)
  CHECK(fpf::text::load_document(pdf).text.find("Hello from a PDF document.") != std::string::npos);
#else
  CHECK_THROWS_WITH(fpf::text::load_document(pdf), doctest::Contains("needs fpf built with poppler-cpp"));
#endif
}
