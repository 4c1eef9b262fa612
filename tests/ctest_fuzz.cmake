# Fuzz target for the tokenizer (tests/fuzz/fuzz_tokenizer.cpp), run by CTest for a bounded time as "fuzz.tokenizer"
# (label "fuzz"). With clang it is a libFuzzer binary (needs Debian's libclang-rt-14-dev); with GCC the same target
# runs under tests/fuzz/standalone_driver.cpp, which mutates the seeds at random. Both build with AddressSanitizer
# and UndefinedBehaviorSanitizer where the compiler has them. FPF_FUZZ_SECONDS sets the time.
set(FPF_FUZZ_SECONDS 20 CACHE STRING "Seconds the tokenizer fuzz test runs")
include(CheckCXXSourceCompiles)

add_executable(fpf_fuzz_tokenizer ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/fuzz_tokenizer.cpp)
target_link_libraries(fpf_fuzz_tokenizer PRIVATE fpf::fpf)
target_compile_definitions(fpf_fuzz_tokenizer PRIVATE FPF_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
set(_fpf_fuzz_seeds ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/seeds)

set(_fpf_sanitizers -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
set(CMAKE_REQUIRED_FLAGS "-fsanitize=fuzzer,address")
check_cxx_source_compiles(
  "#include <cstdint>\n#include <cstddef>\nextern \"C\" int LLVMFuzzerTestOneInput(const std::uint8_t*, std::size_t) { return 0; }"
  FPF_HAVE_LIBFUZZER)
set(CMAKE_REQUIRED_FLAGS "-fsanitize=address,undefined")
check_cxx_source_compiles("int main() { return 0; }" FPF_HAVE_SANITIZERS)
unset(CMAKE_REQUIRED_FLAGS)

if(FPF_HAVE_LIBFUZZER)
  target_compile_options(fpf_fuzz_tokenizer PRIVATE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
                         -fno-omit-frame-pointer)
  target_link_options(fpf_fuzz_tokenizer PRIVATE -fsanitize=fuzzer,address,undefined)
  # libFuzzer adds new inputs to the first corpus folder: keep that in the build tree, seeds read-only.
  file(MAKE_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}/fuzz-corpus)
  add_test(NAME fuzz.tokenizer
           COMMAND fpf_fuzz_tokenizer -max_total_time=${FPF_FUZZ_SECONDS} -max_len=8192 -rss_limit_mb=4096
                   ${CMAKE_CURRENT_BINARY_DIR}/fuzz-corpus ${_fpf_fuzz_seeds})
else()
  target_sources(fpf_fuzz_tokenizer PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/standalone_driver.cpp)
  if(FPF_HAVE_SANITIZERS)
    target_compile_options(fpf_fuzz_tokenizer PRIVATE ${_fpf_sanitizers})
    target_link_options(fpf_fuzz_tokenizer PRIVATE -fsanitize=address,undefined)
  endif()
  add_test(NAME fuzz.tokenizer COMMAND fpf_fuzz_tokenizer --seconds ${FPF_FUZZ_SECONDS} ${_fpf_fuzz_seeds})
endif()
# Run in the build tree (the standalone driver writes fuzz-crash-input there); loading the tokenizer takes ~1 s more
# under the sanitizers, hence the margin.
set_tests_properties(fuzz.tokenizer PROPERTIES LABELS fuzz WORKING_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}
                     TIMEOUT 300)
