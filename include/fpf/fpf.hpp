#pragma once
// Umbrella header: #include <fpf/fpf.hpp>
#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>
#include <fpf/taps/signals.hpp>
