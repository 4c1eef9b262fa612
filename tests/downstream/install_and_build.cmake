# CTest driver: installs the fpf build tree into a fresh prefix, builds tests/downstream against it with
# find_package(fpf), and runs the result on a fixture. Variables: FPF_BINARY_DIR, FPF_SOURCE_DIR, WORK_DIR.
file(REMOVE_RECURSE ${WORK_DIR})
function(step)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}\n${out}\n${err}")
  endif()
  set(last_output "${out}" PARENT_SCOPE)
endfunction()
step(${CMAKE_COMMAND} --install ${FPF_BINARY_DIR} --prefix ${WORK_DIR}/prefix --component library)
step(${CMAKE_COMMAND} -S ${FPF_SOURCE_DIR}/tests/downstream -B ${WORK_DIR}/build -G Ninja
     -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DCMAKE_BUILD_TYPE=Release)
step(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
step(${WORK_DIR}/build/downstream ${FPF_SOURCE_DIR}/tests/fixtures/models/dense_tied)
message(STATUS "downstream: ${last_output}")
if(NOT last_output MATCHES "^tokens [0-9]+ [0-9]+")
  message(FATAL_ERROR "unexpected output: ${last_output}")
endif()
