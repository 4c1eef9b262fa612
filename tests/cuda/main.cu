// The GPU test binary (CTest label "cuda"; runs on the device machine, never in CI).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
