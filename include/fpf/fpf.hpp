#pragma once
// Umbrella header: #include <fpf/fpf.hpp>
#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>
#include <fpf/io/config.hpp>
#include <fpf/io/safetensors.hpp>
#include <fpf/taps/signals.hpp>
#include <fpf/taps/capture.hpp>
#include <fpf/attention/attention.hpp>
#include <fpf/quant/dense.hpp>
#include <fpf/engine/setup.hpp>
#include <fpf/engine/options.hpp>
#include <fpf/backend/cpu/backend.hpp>
#include <fpf/engine/engine.hpp>
#include <fpf/text/tokenizer.hpp>
#include <fpf/text/chat_template.hpp>
#include <fpf/text/prompt.hpp>
