# Two CTest entries for the experiment analysis, in one file that plays two roles:
# - include()d by tests/CMakeLists.txt, it registers the tests, each running this same file in script mode;
# - run with `cmake -P`, it performs the check named by -DCHECK=...
#
#   report_html_chromium: fpf-compare --html on the fixture, then headless Chromium (Debian's `chromium`) loads the
#     page; the DOM must report the rendered charts (<body data-rendered-charts>, set by the page's script after
#     layout from the charts' bounding boxes) and a screenshot must be written.
#   seed_script_reads_fpf_file: the seed's compare_experiments.py (scripts/seed_compare_experiments.py, with the
#     reader stand-in from tests/fixtures/experiment/seed_common) reads an fpf file without error.
# Both are skipped (not failed) when chromium, or python3 with numpy, is missing: scripts/install-deps.sh --report
# installs chromium.
if(NOT CMAKE_SCRIPT_MODE_FILE)
  if(NOT TARGET fpf-compare)  # programs not built (FPF_BUILD_EXAMPLES=OFF)
    return()
  endif()
  set(_fpf_report_args
    -DFPF_COMPARE=$<TARGET_FILE:fpf-compare>
    -DFIXTURE=${CMAKE_CURRENT_SOURCE_DIR}/fixtures/experiment/two_hardware.json
    -DSEED_SCRIPT=${PROJECT_SOURCE_DIR}/scripts/seed_compare_experiments.py
    -DSEED_COMMON=${CMAKE_CURRENT_SOURCE_DIR}/fixtures/experiment/seed_common)
  add_test(NAME report_html_chromium
    COMMAND ${CMAKE_COMMAND} -DCHECK=chromium ${_fpf_report_args}
            -DWORK=${CMAKE_CURRENT_BINARY_DIR}/report-chromium -P ${CMAKE_CURRENT_LIST_FILE})
  add_test(NAME seed_script_reads_fpf_file
    COMMAND ${CMAKE_COMMAND} -DCHECK=seed ${_fpf_report_args}
            -DWORK=${CMAKE_CURRENT_BINARY_DIR}/report-seed -P ${CMAKE_CURRENT_LIST_FILE})
  set_tests_properties(report_html_chromium seed_script_reads_fpf_file PROPERTIES
    SKIP_REGULAR_EXPRESSION "FPF-SKIP" LABELS report TIMEOUT 180)
  return()
endif()

file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

if(CHECK STREQUAL "chromium")
  find_program(CHROMIUM NAMES chromium chromium-browser)
  if(NOT CHROMIUM)
    message("FPF-SKIP: chromium not found (scripts/install-deps.sh --report installs it)")
    return()
  endif()
  execute_process(COMMAND "${FPF_COMPARE}" "${FIXTURE}" --output "${WORK}/res.json" --html "${WORK}/report.html"
                  WORKING_DIRECTORY "${WORK}" RESULT_VARIABLE rc OUTPUT_QUIET)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "fpf-compare --html failed: ${rc}")
  endif()
  set(flags --headless --no-sandbox --disable-gpu --disable-background-networking --no-first-run
            "--user-data-dir=${WORK}/profile" --window-size=1200,2400)
  execute_process(COMMAND "${CHROMIUM}" ${flags} --dump-dom "file://${WORK}/report.html"
                  OUTPUT_VARIABLE dom ERROR_QUIET RESULT_VARIABLE rc TIMEOUT 90)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "chromium --dump-dom failed: ${rc}")
  endif()
  # The page has three charts (per layer, per step, ratios); each must have drawn marks of nonzero size.
  if(NOT dom MATCHES "data-rendered-charts=\"([0-9]+)\"")
    message(FATAL_ERROR "the page's chart check did not run in chromium:\n${dom}")
  endif()
  set(rendered "${CMAKE_MATCH_1}")
  if(rendered LESS 3)
    message(FATAL_ERROR "chromium rendered ${rendered} of 3 charts")
  endif()
  foreach(chart per-layer per-step ratios)
    if(NOT dom MATCHES "data-chart=\"${chart}\"")
      message(FATAL_ERROR "chart ${chart} missing from the DOM")
    endif()
  endforeach()
  if(NOT dom MATCHES "<table id=\"summary\">")
    message(FATAL_ERROR "summary table missing from the DOM")
  endif()
  execute_process(COMMAND "${CHROMIUM}" ${flags} "--screenshot=${WORK}/report.png" "file://${WORK}/report.html"
                  OUTPUT_QUIET ERROR_QUIET RESULT_VARIABLE rc TIMEOUT 90)
  file(SIZE "${WORK}/report.png" png_size)
  if(NOT rc EQUAL 0 OR png_size LESS 20000)
    message(FATAL_ERROR "screenshot failed or nearly empty (${png_size} bytes)")
  endif()
  message("chromium rendered ${rendered} charts; screenshot ${WORK}/report.png (${png_size} bytes)")

elseif(CHECK STREQUAL "seed")
  # Debian's python3 has numpy from python3-numpy; a python3 earlier on PATH may not.
  set(python "")
  find_program(PY_ON_PATH NAMES python3)
  foreach(candidate "${PY_ON_PATH}" /usr/bin/python3)
    if(candidate AND python STREQUAL "")
      execute_process(COMMAND "${candidate}" -c "import numpy" RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
      if(rc EQUAL 0)
        set(python "${candidate}")
      endif()
    endif()
  endforeach()
  if(python STREQUAL "")
    message("FPF-SKIP: no python3 with numpy (apt-get install python3-numpy)")
    return()
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} -E env "PYTHONPATH=${SEED_COMMON}"
                          "${python}" "${SEED_SCRIPT}" "${FIXTURE}" --output "${WORK}/seed.json"
                  WORKING_DIRECTORY "${WORK}" OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "the seed's script failed on an fpf file (${rc}):\n${out}\n${err}")
  endif()
  file(READ "${WORK}/seed.json" seed_json)
  string(JSON type GET "${seed_json}" experiment_type)
  if(NOT type STREQUAL "batch_size")
    message(FATAL_ERROR "unexpected seed report: ${seed_json}")
  endif()
  message("the seed's script read ${FIXTURE}")
else()
  message(FATAL_ERROR "unknown CHECK=${CHECK}")
endif()
