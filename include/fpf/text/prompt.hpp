#pragma once
// Prompt builder for the experiments: the first N tokens of a long document (cut at a token boundary), followed by
// a summary request, wrapped in Qwen3's chat template as one user message:
//   <|im_start|>user\n  {document: exactly N tokens}  \n\n{request}<|im_end|>\n<|im_start|>assistant\n ...
// The prompt is assembled from token ids, so the document contributes exactly N tokens whatever the cut: the ids are
// what the model is fed. Prompt::text is their decoding; where the cut falls inside a word (or a character), encoding
// that text again can merge differently at the seams, and Prompt::text_reencodes says whether it does not.
// Batch neighbours come from different documents, each exactly N tokens, so all prompts of a batch have one length.
// Documents are UTF-8 text files or, when fpf is built with poppler-cpp (FPF_HAVE_POPPLER), PDFs.
#include <fpf/core/error.hpp>
#include <fpf/text/chat_template.hpp>
#include <fpf/text/tokenizer.hpp>
#include <fpf/text/utf8.hpp>

#if defined(FPF_HAVE_POPPLER)
#include <poppler-document.h>
#include <poppler-page.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace fpf::text {

struct Document {
  std::string name;  // the file name, or what the caller calls it
  std::string text;  // UTF-8
};

// Text of a PDF, pages joined by "\n". Needs poppler-cpp (FPF_HAVE_POPPLER); without it, fpf::Error.
inline std::string read_pdf_text(const std::filesystem::path& path) {
#if defined(FPF_HAVE_POPPLER)
  std::unique_ptr<poppler::document> doc(poppler::document::load_from_file(path.string()));
  if (!doc) throw Error(path.string(), "not a readable PDF");
  if (doc->is_locked()) throw Error(path.string(), "the PDF is encrypted");
  std::string text;
  for (int i = 0; i < doc->pages(); ++i) {
    std::unique_ptr<poppler::page> page(doc->create_page(i));
    if (!page) continue;
    const auto bytes = page->text().to_utf8();
    if (!text.empty()) text += '\n';
    text.append(bytes.begin(), bytes.end());
  }
  return text;
#else
  throw Error(path.string(), "reading PDFs needs fpf built with poppler-cpp (FPF_HAVE_POPPLER)");
#endif
}

// A .pdf through poppler-cpp, anything else as UTF-8 text (invalid UTF-8 is an error naming the byte).
inline Document load_document(const std::filesystem::path& path) {
  Document d{path.filename().string(), {}};
  if (path.extension() == ".pdf" || path.extension() == ".PDF") {
    d.text = read_pdf_text(path);
  } else {
    d.text = detail::read_file(path);
  }
  check_utf8(d.text, path.string());
  return d;
}

// Every .txt and .pdf file of a folder, sorted by name.
inline std::vector<Document> load_corpus(const std::filesystem::path& dir) {
  if (!std::filesystem::is_directory(dir)) throw Error(dir.string(), "not a folder");
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const auto ext = e.path().extension();
    if (e.is_regular_file() && (ext == ".txt" || ext == ".pdf")) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) throw Error(dir.string(), "no .txt or .pdf documents");
  std::vector<Document> docs;
  for (const auto& f : files) docs.push_back(load_document(f));
  return docs;
}

// The data folder that holds qwen3-tokenizer/ and corpus/: $FPF_DATA_DIR, else the source tree's data/ when the
// program was compiled with FPF_SOURCE_DIR (fpf's own programs and tests are).
inline std::filesystem::path data_dir() {
  if (const char* env = std::getenv("FPF_DATA_DIR"); env && *env) return env;
#if defined(FPF_SOURCE_DIR)
  return std::filesystem::path(FPF_SOURCE_DIR) / "data";
#else
  throw Error("FPF_DATA_DIR", "not set (the folder with qwen3-tokenizer/ and corpus/, data/ in fpf's sources)");
#endif
}
inline std::filesystem::path default_tokenizer_dir() { return data_dir() / "qwen3-tokenizer"; }
inline std::filesystem::path default_corpus_dir() { return data_dir() / "corpus"; }

struct PromptSpec {
  std::size_t document_tokens = 6000;
  std::string request = "Provide a summary of the text above.";
  std::string separator = "\n\n";  // between the document and the request
  std::optional<std::string> system;
  std::optional<bool> enable_thinking;  // unset: the template's default (thinking on)
};

struct Prompt {
  std::string document;       // Document::name
  std::vector<TokenId> ids;   // the whole prompt, as fed to the model
  std::size_t document_begin = 0, document_end = 0;  // the document's tokens: ids[begin, end), end - begin == N
  std::string text;           // decode(ids)
  bool text_reencodes = false;  // encode(text) == ids
  std::size_t length() const noexcept { return ids.size(); }
};

// The prompt for one document (leading whitespace of the document is skipped). fpf::Error if the document has
// fewer than spec.document_tokens tokens.
inline Prompt build_prompt(const Tokenizer& tok, const Document& doc, const PromptSpec& spec) {
  if (spec.document_tokens == 0) throw Error("prompt", "document_tokens must be positive");
  const auto start = doc.text.find_first_not_of(" \t\r\n\f\v");
  const std::string_view body =
      start == std::string::npos ? std::string_view{} : std::string_view(doc.text).substr(start);
  const auto doc_ids = tok.encode(body);
  if (doc_ids.size() < spec.document_tokens)
    throw Error(doc.name, "has " + std::to_string(doc_ids.size()) + " tokens; the prompt needs " +
                              std::to_string(spec.document_tokens));
  const ChatParts chat = chat_parts({spec.system, "", true, spec.enable_thinking});
  Prompt p;
  p.document = doc.name;
  tok.encode_into(chat.before_user, p.ids);
  p.document_begin = p.ids.size();
  p.ids.insert(p.ids.end(), doc_ids.begin(), doc_ids.begin() + static_cast<std::ptrdiff_t>(spec.document_tokens));
  p.document_end = p.ids.size();
  tok.encode_into(spec.separator + spec.request + chat.after_user, p.ids);
  p.text = tok.decode(p.ids);
  p.text_reencodes = tok.encode(p.text) == p.ids;
  return p;
}

// One prompt per document for a batch of `batch_size`: prompt i from docs[i], each exactly N document tokens, so
// all have the same length. The documents must differ from one another.
inline std::vector<Prompt> build_batch(const Tokenizer& tok, std::span<const Document> docs, const PromptSpec& spec,
                                       std::size_t batch_size) {
  if (docs.size() < batch_size)
    throw Error("prompt batch", "batch size " + std::to_string(batch_size) + " needs as many documents; " +
                                    std::to_string(docs.size()) + " given");
  for (std::size_t i = 0; i < batch_size; ++i)
    for (std::size_t j = 0; j < i; ++j)
      if (docs[i].text == docs[j].text)
        throw Error("prompt batch", docs[i].name + " and " + docs[j].name + " are the same document");
  std::vector<Prompt> batch;
  for (std::size_t i = 0; i < batch_size; ++i) batch.push_back(build_prompt(tok, docs[i], spec));
  return batch;
}

}  // namespace fpf::text
