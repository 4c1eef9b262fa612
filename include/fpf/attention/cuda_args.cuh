#pragma once
// What the CUDA attention kernels read: a batch of query rows, each belonging to one sequence and sitting at one
// absolute position; row r sees keys 0..row_pos[r] of its own sequence's cache (causal, never another sequence's:
// each sequence has its own cache, so a batch has no padding that could leak). Caches are [capacity,
// num_kv_heads * head_dim] in T; query head h reads KV head h / (num_heads / num_kv_heads) (GQA).
#include <cstddef>
#include <cstdint>

#include <fpf/backend/cuda/common.cuh>
#include <fpf/backend/cuda/gemm.cuh>
#include <fpf/backend/cuda/ops.cuh>

namespace fpf::attn {

template <class T>
struct CudaArgs {
  const T* q = nullptr;           // row r, head h at q + r * q_stride + h * head_dim
  std::size_t q_stride = 0;
  T* const* kcache = nullptr;     // device array: sequence -> key cache
  T* const* vcache = nullptr;     // device array: sequence -> value cache
  const std::int32_t* row_seq = nullptr;
  const std::int32_t* row_pos = nullptr;
  int rows = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int max_keys = 0;               // max over rows of row_pos + 1 (host-side, for sizing)
  float scale = 0.0f;
  T* out = nullptr;               // [rows, num_heads * head_dim]
  // Device scratch for the split-keys decode path (split_scratch_floats() floats); null: no split.
  float* scratch = nullptr;
};

// Decode (few rows, long caches) splits each row's keys into chunks of kSplitKeys processed by separate blocks, then
// combines the chunks in chunk order (flash-decoding for Flash; for Eager the scores are materialized in global
// memory and P.V is summed per chunk, then over chunks). Used when rows <= kSplitMaxRows and scratch is given.
inline constexpr int kSplitKeys = 128;
inline constexpr int kSplitMaxRows = 8;
__host__ __device__ inline std::size_t split_chunks(int max_keys) { return static_cast<std::size_t>((max_keys + kSplitKeys - 1) / kSplitKeys); }
// Flash decode uses smaller chunks (a 6k-token cache then spreads over ~94 blocks per KV head): kFlashSplitKeys
// rounded up to whole tiles of the policy's Bc.
inline constexpr int kFlashSplitKeys = 64;
__host__ __device__ constexpr int flash_chunk_keys(int bc) { return (kFlashSplitKeys + bc - 1) / bc * bc; }
__host__ __device__ inline std::size_t flash_split_chunks(int max_keys, int bc) {
  return static_cast<std::size_t>((max_keys + flash_chunk_keys(bc) - 1) / flash_chunk_keys(bc));
}
inline std::size_t split_scratch_floats(int rows, int num_heads, int head_dim, int max_keys) {
  const std::size_t eager = static_cast<std::size_t>(max_keys) + split_chunks(max_keys) * (head_dim + 2);
  const std::size_t flash = flash_split_chunks(max_keys, 1) * (head_dim + 2);  // Bc = 1: the most chunks
  return static_cast<std::size_t>(rows) * num_heads * (eager > flash ? eager : flash);
}

// Prefill (many rows): the batch's sequences, each a run of consecutive rows of the CudaArgs: rows [first_row,
// first_row + rows) at positions p0.., with that sequence's caches.
template <class T>
struct PrefillSeq {
  int first_row = 0, rows = 0, p0 = 0;
  const T* k = nullptr;
  const T* v = nullptr;
};

// What a prefill kernel may use besides its arguments: the model's cuBLASLt handle and two scratch buffers.
template <class T>
struct PrefillWork {
  cuda::Gemm& gemm;
  cuda::DeviceBuffer<float>& scores;
  cuda::DeviceBuffer<T>& probs;
};

template <class A>
struct Cuda;  // Cuda<Policy>::run<T>(args, stream) (any rows) and run_prefill<T>(args, seqs, work, stream): the
              // policy's CUDA kernels (eager.cuh, flash.cuh)

}  // namespace fpf::attn
