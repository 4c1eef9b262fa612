# GPU tests (tests/cuda/*.cu): one doctest binary, registered with CTest under the label "cuda". Built whenever
# FPF_WITH_CUDA is on (CI compiles it: nvcc exists there), run only on a machine with a GPU:
#   ctest -L cuda        (the device machine)      ctest -LE cuda   (CI)
# Tests are registered by name, not discovered (discovery would run the binary at build time).
if(FPF_WITH_CUDA)
  file(GLOB _fpf_cuda_tests CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/cuda/*.cu)
  add_executable(fpf_cuda_tests ${_fpf_cuda_tests})
  target_link_libraries(fpf_cuda_tests PRIVATE fpf::fpf doctest::doctest CUDA::cudart CUDA::cublasLt)
  target_compile_definitions(fpf_cuda_tests PRIVATE FPF_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  foreach(_case IN ITEMS "cuda ops fp32*" "cuda ops bf16*" "cuda ops fp16*" "cuda engine fp32*" "cuda engine: a sequence*"
                         "cuda engine bf16*" "cuda quant ops fp32*" "cuda quant ops bf16*" "cuda quant ops fp16*"
                         "cuda quant engine*")
    string(REGEX REPLACE "[^a-z0-9]+" "_" _name "${_case}")
    string(REGEX REPLACE "_$" "" _name "${_name}")
    add_test(NAME cuda.${_name} COMMAND fpf_cuda_tests "--test-case=${_case}" WORKING_DIRECTORY ${PROJECT_BINARY_DIR})
    set_tests_properties(cuda.${_name} PROPERTIES LABELS "cuda" TIMEOUT 600)
  endforeach()
endif()
