#pragma once
// fpf::Error: the one exception type for bad input. It names where the problem is (a file, a tensor, a field) so
// that a program can print one line and exit 2. Programs wrap their main in fpf::run_main (below).
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

namespace fpf {

class Error : public std::runtime_error {
 public:
  // where: the file (and, after a colon, the tensor or field), e.g. "model/config.json: hidden_size"
  Error(std::string where, const std::string& what)
      : std::runtime_error(where.empty() ? what : where + ": " + what), where_(std::move(where)) {}
  const std::string& where() const noexcept { return where_; }

 private:
  std::string where_;
};

// A check that failed on valid input (nondeterminism, parity, tolerance): exit code 1.
class CheckFailed : public std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Exit codes of every fpf program (DESIGN.md "Programs").
enum ExitCode : int { kExitOk = 0, kExitCheckFailed = 1, kExitBadInput = 2 };

// Runs body(); maps fpf::Error (and other exceptions) to one line on stderr and the documented exit code.
template <class Body>
int run_main(const char* program, Body&& body) noexcept {
  try {
    return std::forward<Body>(body)();
  } catch (const Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return kExitBadInput;
  } catch (const CheckFailed& e) {
    std::fprintf(stderr, "%s: check failed: %s\n", program, e.what());
    return kExitCheckFailed;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return kExitBadInput;
  }
}

}  // namespace fpf
