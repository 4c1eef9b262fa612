# find_package(fpf) from an installed tree (CI runs this; it needs no GPU).
add_test(NAME install.downstream_find_package
         COMMAND ${CMAKE_COMMAND} -DFPF_BINARY_DIR=${PROJECT_BINARY_DIR} -DFPF_SOURCE_DIR=${PROJECT_SOURCE_DIR}
                 -DWORK_DIR=${PROJECT_BINARY_DIR}/test-tmp/downstream -P ${CMAKE_CURRENT_LIST_DIR}/downstream/install_and_build.cmake)
set_tests_properties(install.downstream_find_package PROPERTIES LABELS "install" TIMEOUT 600)
