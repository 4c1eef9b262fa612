#pragma once
// Running fpf's programs from tests: build/bin/PROGRAM ARGS with stdout and stderr to files, the exit code back.
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace fpf::testing {

// Exit code of FPF_BINARY_DIR/bin/program args (-1 if it did not exit normally); stdout and stderr go to the given
// files (their folders are made).
inline int run_program(const std::string& program, const std::string& args, const std::filesystem::path& out,
                       const std::filesystem::path& err) {
  std::filesystem::create_directories(out.parent_path());
  std::filesystem::create_directories(err.parent_path());
  const std::string cmd = std::string(FPF_BINARY_DIR) + "/bin/" + program + " " + args + " > " + out.string() + " 2> " +
                          err.string();
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace fpf::testing
