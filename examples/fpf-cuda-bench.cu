// fpf-cuda-bench: the real-shape run of the CUDA backend, timed. For each attention policy and batch size: --reps
// repetitions of prefill (--prompt-tokens per sequence) + (--steps - 1) greedy decode steps with all taps, checked
// bit-identical across repetitions (an FNV-1a hash over every captured signal of every sequence); prefill time
// and decode ms/token (medians over the repetitions; decode is the wall time from step 1's call to the last step's
// return, over the steps); sequence 0's signals at batch 2/4 compared with batch 1.
//
//   fpf-cuda-bench --model DIR [--prompt-tokens 6000] [--steps 30] [--reps 3] [--batch 1,2,4]
//                  [--attention eager,flash] [--precision bf16] [--layers 1,2,4,12,last] [--json F]
//
// Prompts are seeded random token ids (sequence 0 the same at every batch size; neighbours from other seeds, with
// lengths 1-3% shorter so that batches hold sequences of different lengths). The backend's Model is driven
// directly (as fpf::Engine drives it) so that each forward can be timed; the greedy token is the argmax.
// Exit codes: 0 all repetitions bit-identical; 1 some differ; 2 bad input.
#include <CLI/CLI.hpp>

#include <cuda_profiler_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <fpf/backend/cuda/backend.cuh>
#include <fpf/engine/dispatch.hpp>
#include <fpf/fpf.hpp>
#include <fpf/taps/parse.hpp>

#include "common/cli.hpp"

namespace {

using Clock = std::chrono::steady_clock;

struct Fnv {
  std::uint64_t h = 0xcbf29ce484222325ull;
  void bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  }
  template <class V>
  void vec(const std::vector<V>& v) { bytes(v.data(), v.size() * sizeof(V)); }
};

// One run: per step, per sequence, the Captured signals (sequence 0 kept whole for the batch comparison).
struct Run {
  std::vector<std::uint64_t> hash;                 // per sequence
  std::vector<std::vector<std::int32_t>> tokens;   // per sequence
  std::vector<fpf::Captured> seq0;                 // per step
  double prefill_ms = 0, decode_ms_per_token = 0;
};

template <class Model>
Run run_once(Model& m, const std::vector<std::vector<std::int32_t>>& prompts, int steps, const fpf::taps::TapSpec& spec) {
  const int B = static_cast<int>(prompts.size());
  const int back = -*std::min_element(spec.positions.begin(), spec.positions.end());
  Run r;
  r.hash.assign(B, 0);
  r.tokens.assign(B, {});
  std::vector<Fnv> h(B);
  std::vector<std::vector<std::int32_t>> fed = prompts;
  m.reset(B);
  // Decode is timed from step 1's call to the last step's return, the caller doing no more than picking the next
  // tokens in between: the signals are hashed after the loop (hashing them between the steps took ~50 us a step,
  // during which a pipelined backend's GPU keeps running, so per-call times would then undercount).
  std::vector<std::vector<fpf::Captured>> caps;
  Clock::time_point decode_t0{};
  for (int s = 0; s < steps; ++s) {
    std::vector<fpf::Chunk> chunks(B);
    std::vector<std::int32_t> last(B);
    for (int b = 0; b < B; ++b) {
      const int n = static_cast<int>(fed[b].size());
      if (s == 0) chunks[b] = {std::span<const std::int32_t>(fed[b]), std::max(0, n - back)};
      else last[b] = fed[b].back(), chunks[b] = {std::span<const std::int32_t>(&last[b], 1), n - 1};
    }
    // FPF_NCU_STEP=s: the profiler range (ncu --profile-from-start off) covers step s of every run.
    static const int ncu_step = std::getenv("FPF_NCU_STEP") ? std::atoi(std::getenv("FPF_NCU_STEP")) : -1;
    if (s == ncu_step) cudaProfilerStart();
    const auto t0 = Clock::now();
    if (s == 1) decode_t0 = t0;
    caps.push_back(m.forward(chunks, spec));
    if (s == ncu_step) cudaProfilerStop();
    if (s == 0) r.prefill_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    for (int b = 0; b < B; ++b) fed[b].push_back(caps.back()[b].at(static_cast<int>(fed[b].size()) - 1).argmax);
  }
  const double decode_ms = steps > 1 ? std::chrono::duration<double, std::milli>(Clock::now() - decode_t0).count() : 0;
  for (auto& cap : caps) {
    for (int b = 0; b < B; ++b) {
      r.tokens[b].push_back(fed[b][r.tokens[b].size() + prompts[b].size()]);
      for (const auto& [pos, ps] : cap[b]) {
        h[b].bytes(&pos, sizeof pos);
        for (const auto& [l, v] : ps.hidden) h[b].vec(v);
        for (const auto& [l, v] : ps.keys) h[b].vec(v);
        h[b].vec(ps.logprobs.token_ids);
        h[b].vec(ps.logprobs.log_probs);
      }
    }
    r.seq0.push_back(std::move(cap[0]));
  }
  for (int b = 0; b < B; ++b) r.hash[b] = h[b].h;
  r.decode_ms_per_token = steps > 1 ? decode_ms / (steps - 1) : 0;
  return r;
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Device-to-device copy bandwidth (bytes read + written per second), the HBM ceiling the roofline uses.
double copy_bandwidth_gbs() {
  const std::size_t n = std::size_t{2} << 30;
  fpf::cuda::DeviceBuffer<std::byte> a(n), b(n);
  FPF_CUDA(cudaMemset(a.get(), 1, n));
  cudaEvent_t e0, e1;
  FPF_CUDA(cudaEventCreate(&e0));
  FPF_CUDA(cudaEventCreate(&e1));
  std::vector<double> gbs;
  for (int i = 0; i < 12; ++i) {
    FPF_CUDA(cudaEventRecord(e0));
    FPF_CUDA(cudaMemcpy(b.get(), a.get(), n, cudaMemcpyDeviceToDevice));
    FPF_CUDA(cudaEventRecord(e1));
    FPF_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    FPF_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 2) gbs.push_back(2.0 * static_cast<double>(n) / (ms * 1e-3) / 1e9);
  }
  std::sort(gbs.begin(), gbs.end());
  return gbs[gbs.size() / 2];
}

// Bytes one decode step of batch 1 must read at least, in the checkpoint's own format: every tensor it uses as the
// file stores it (4-bit codes, scales, zeros, g_idx, absmax; dense float tensors at the run's element size elem):
// attention, norms, router, lm_head, and top-k of each layer's experts (the layer's expert bytes / E * k); one row of
// the embedding; plus the KV cache of `keys` positions in the run's element size.
double decode_bytes(const fpf::io::Checkpoint& ckpt, const fpf::io::ModelConfig& c, std::size_t elem, std::int64_t keys) {
  const double nkv = static_cast<double>(c.num_key_value_heads) * c.head_dim;
  double total = static_cast<double>(keys) * 2 * nkv * static_cast<double>(elem) * c.num_hidden_layers;
  double experts = 0;
  for (const std::string& name : ckpt.names()) {
    const fpf::io::TensorInfo& t = ckpt.get(name);
    double b = static_cast<double>(t.bytes.size());
    const bool is_float = t.dtype == fpf::DType::F32 || t.dtype == fpf::DType::BF16 || t.dtype == fpf::DType::F16;
    const bool quant_side = name.find(".scales") != std::string::npos || name.find(".absmax") != std::string::npos ||
                            name.find(".quant_map") != std::string::npos;
    if (is_float && !quant_side) b = b / static_cast<double>(fpf::dtype_size(t.dtype)) * static_cast<double>(elem);
    if (name.rfind("model.embed_tokens.", 0) == 0) {
      total += b / static_cast<double>(c.vocab_size);
      if (!c.tie_word_embeddings) continue;
      total += b;  // tied: the lm_head product reads it whole
    } else if (name.find(".mlp.experts.") != std::string::npos) {
      experts += b;
    } else {
      total += b;
    }
  }
  return total + (c.num_experts > 0 ? experts / c.num_experts * c.num_experts_per_tok : 0.0);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fpf-cuda-bench: timed real-shape runs of the CUDA backend"};
  std::string model_dir, batches_text = "1,2,4", attentions_text = "eager,flash", precision_text, layers_text, json_out;
  int prompt_tokens = 6000, steps = 30, reps = 3;
  app.add_option("--model", model_dir, "checkpoint directory")->required();
  app.add_option("--prompt-tokens", prompt_tokens, "tokens per prompt (sequence 0)");
  app.add_option("--steps", steps, "greedy steps (step 0 = prefill)");
  app.add_option("--reps", reps, "repetitions per configuration");
  app.add_option("--batch", batches_text, "batch sizes");
  app.add_option("--attention", attentions_text, "eager,flash");
  app.add_option("--precision", precision_text, "fp32 | bf16 | fp16 (default: the checkpoint dtype)");
  app.add_option("--layers", layers_text, "tapped layers (default 1,2,4,12,last)");
  app.add_option("--json", json_out, "also write the results as JSON lines to this file");
  if (auto code = fpf::examples::parse(app, "fpf-cuda-bench", argc, argv)) return *code;
  return fpf::run_main("fpf-cuda-bench", [&] {
    const fpf::io::ModelConfig cfg = fpf::io::load_config(model_dir);
    const fpf::io::Checkpoint ckpt = fpf::io::Checkpoint::open(model_dir);
    if (precision_text.empty()) precision_text = cfg.dtype == "bfloat16" ? "bf16" : cfg.dtype == "float16" ? "fp16" : "fp32";
    const fpf::Precision precision = fpf::parse_precision(precision_text);
    fpf::taps::TapSpec spec;
    spec.layers = layers_text.empty() ? fpf::taps::default_layers(cfg.num_hidden_layers)
                                      : fpf::taps::parse_layers(layers_text, cfg.num_hidden_layers);
    std::vector<int> batches;
    for (int b : fpf::taps::parse_int_list(batches_text, "--batch")) {
      if (b < 1 || b > 64) throw fpf::Error("--batch", "batch sizes must be in 1..64");
      batches.push_back(b);
    }
    if (prompt_tokens < 4) throw fpf::Error("--prompt-tokens", "must be at least 4");
    if (steps < 1 || reps < 1) throw fpf::Error("--steps/--reps", "must be at least 1");
    const int max_b = *std::max_element(batches.begin(), batches.end());
    std::vector<std::vector<std::int32_t>> all(max_b);
    for (int b = 0; b < max_b; ++b) {
      std::uint64_t s = 0x1234567ull + 7919ull * b;
      const int len = b == 0 ? prompt_tokens : prompt_tokens - prompt_tokens * (b % 3 + 1) / 100;
      for (int i = 0; i < len; ++i) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        all[b].push_back(static_cast<std::int32_t>((s >> 33) % static_cast<std::uint64_t>(std::min<std::int64_t>(cfg.vocab_size, 150000))));
      }
    }
    std::printf("device %s; model %s: %d layers, hidden %d, %d experts top-%d; %s; prompt %d tokens, %d steps, %d reps\n",
                fpf::cuda::require_device().c_str(), model_dir.c_str(), cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts,
                cfg.num_experts_per_tok, precision_text.c_str(), prompt_tokens, steps, reps);
    const double bw = copy_bandwidth_gbs();
    const std::size_t elem = precision == fpf::Precision::fp32 ? 4 : 2;
    const double bytes = decode_bytes(ckpt, cfg, elem, prompt_tokens + steps / 2);
    const std::string scheme(fpf::quant::policy_name(fpf::quant::load_quant_config(model_dir)));
    std::printf("HBM copy bandwidth %.0f GB/s (read + write, 2 GiB device-to-device, median of 10); %s decode bytes/token at "
                "batch 1 %.3f GB -> roofline %.3f ms/token\n",
                bw, scheme.c_str(), bytes / 1e9, bytes / 1e9 / bw * 1e3);
    const double roofline_ms = bytes / 1e9 / bw * 1e3;
    std::FILE* js = json_out.empty() ? nullptr : std::fopen(json_out.c_str(), "w");
    bool all_ok = true;
    for (const std::string attention : {std::string("eager"), std::string("flash")}) {
      if (attentions_text.find(attention) == std::string::npos) continue;
      fpf::with_setup_for(model_dir, "cuda", attention, [&]<class S>() {
        const auto t0 = Clock::now();
        typename S::backend::template Model<S> model(ckpt, cfg, fpf::EngineOptions{precision});
        std::printf("%s %s: weights loaded in %.1f s\n", S::quant::name.data(), attention.c_str(),
                    std::chrono::duration<double>(Clock::now() - t0).count());
        std::vector<fpf::Captured> seq0_bs1;
        std::vector<std::int32_t> bs1_tokens;
        for (int B : batches) {
          std::vector<std::vector<std::int32_t>> prompts(all.begin(), all.begin() + B);
          run_once(model, prompts, std::min(steps, 2), spec);  // warm-up (clocks, cuBLASLt plans, allocations)
          std::vector<Run> runs;
          for (int r = 0; r < reps; ++r) runs.push_back(run_once(model, prompts, steps, spec));
          bool same = true;
          for (const Run& r : runs) same = same && r.hash == runs[0].hash && r.tokens == runs[0].tokens;
          all_ok = all_ok && same;
          std::vector<double> pre, dec;
          for (const Run& r : runs) pre.push_back(r.prefill_ms), dec.push_back(r.decode_ms_per_token);
          // Sequence 0 against batch 1: step 0 (the prefill's captured positions) on its own, then every later step
          // while the greedy tokens so far agree (after a divergence the two runs feed different tokens).
          double worst_h = 0, worst_k = 0, worst_lp = 0, pre_h = 0, pre_k = 0, pre_lp = 0;
          int first_token_diff = -1, compared_steps = 0;
          if (B == 1) seq0_bs1 = runs[0].seq0;
          else if (!seq0_bs1.empty()) {
            for (std::size_t s = 0; s < runs[0].seq0.size() && s < seq0_bs1.size(); ++s) {
              bool token_diff = false;
              for (const auto& [pos, ps] : runs[0].seq0[s]) {
                auto it = seq0_bs1[s].find(pos);
                if (it == seq0_bs1[s].end()) continue;
                for (const auto& [l, v] : ps.hidden) worst_h = std::max(worst_h, rel_l2(v, it->second.hidden.at(l)));
                for (const auto& [l, v] : ps.keys) worst_k = std::max(worst_k, rel_l2(v, it->second.keys.at(l)));
                if (ps.logprobs.token_ids == it->second.logprobs.token_ids)
                  worst_lp = std::max(worst_lp, rel_l2(ps.logprobs.log_probs, it->second.logprobs.log_probs));
                else
                  worst_lp = std::max(worst_lp, 1.0);  // the top-k ids themselves differ
              }
              if (runs[0].tokens[0][s] != bs1_tokens[s]) token_diff = true;
              if (s == 0) pre_h = worst_h, pre_k = worst_k, pre_lp = worst_lp;
              ++compared_steps;
              if (token_diff) {
                first_token_diff = static_cast<int>(s);
                break;
              }
            }
          }
          if (B == 1) bs1_tokens = runs[0].tokens[0];
          std::printf("%s %s bs%d: %d reps %s (seq0 hash %016llx); prefill %.1f ms (%d tokens/seq), decode %.3f ms/token",
                      scheme.c_str(), attention.c_str(), B, reps, same ? "bit-identical" : "DIFFER", static_cast<unsigned long long>(runs[0].hash[0]),
                      median(pre), prompt_tokens, median(dec));
          if (B == 1) std::printf(" (%.1f%% of the roofline)", 100.0 * roofline_ms / median(dec));
          std::printf(" [prefill reps:");
          for (double p : pre) std::printf(" %.1f", p);
          std::printf("; decode reps:");
          for (double d : dec) std::printf(" %.3f", d);
          std::printf("]\n  tokens seq0:");
          for (auto t : runs[0].tokens[0]) std::printf(" %d", t);
          std::printf("\n");
          if (B > 1)
            std::printf("  seq0 vs bs1: prefill (step 0) max rel L2 hidden %.3g key %.3g logprob %.3g; over the %d steps with the "
                        "same inputs: hidden %.3g key %.3g logprob %.3g; first differing greedy token at step %d (-1: none)\n",
                        pre_h, pre_k, pre_lp, compared_steps, worst_h, worst_k, worst_lp, first_token_diff);
          if (js)
            std::fprintf(js,
                         "{\"scheme\":\"%s\",\"attention\":\"%s\",\"batch\":%d,\"reps\":%d,\"bit_identical\":%s,\"prefill_ms\":%.3f,"
                         "\"decode_ms_per_token\":%.4f,\"seq0_vs_bs1_prefill_hidden\":%.6g,\"seq0_vs_bs1_prefill_key\":%.6g,"
                         "\"seq0_vs_bs1_prefill_logprob\":%.6g,\"seq0_vs_bs1_hidden\":%.6g,\"seq0_vs_bs1_key\":%.6g,"
                         "\"seq0_vs_bs1_logprob\":%.6g,\"first_token_diff_step\":%d}\n",
                         scheme.c_str(), attention.c_str(), B, reps, same ? "true" : "false", median(pre), median(dec), pre_h, pre_k, pre_lp, worst_h,
                         worst_k, worst_lp, first_token_diff);
          std::fflush(stdout);
        }
        return 0;
      });
    }
    if (js) std::fclose(js);
    return all_ok ? fpf::kExitOk : fpf::kExitCheckFailed;
  });
}
