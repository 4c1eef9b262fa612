#pragma once
// The CUDA backend's own kernels, one per op of the forward pass, each with a host launcher. Every kernel reads and
// writes the storage type T (float, bf16 or fp16) and computes in fp32 (double where the CPU reference does), with
// one fixed reduction order per op: no atomics, no order that depends on timing, so a launch with the same inputs
// and the same shapes gives the same bits every time. Each op is tested against its CPU reference
// (backend/cpu/ops.hpp) in tests/cuda/test_cuda_ops.cu.
#include <cstdint>

#include <fpf/backend/cuda/common.cuh>

namespace fpf::cuda::ops {

// ---------------------------------------------------------------------------------------------------------------
// dtype conversion (weights arrive as F32/BF16/F16 bytes; widening is exact, narrowing rounds to nearest even)
// ---------------------------------------------------------------------------------------------------------------
template <class T>
__global__ void k_convert(const void* __restrict__ src, int src_dtype, T* __restrict__ dst, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
    float v;
    if (src_dtype == static_cast<int>(DType::F32)) v = static_cast<const float*>(src)[i];
    else if (src_dtype == static_cast<int>(DType::BF16)) v = __bfloat162float(static_cast<const bf16*>(src)[i]);
    else v = __half2float(static_cast<const fp16*>(src)[i]);
    dst[i] = from_f<T>(v);
  }
}
template <class T>
void convert(const void* src, DType src_dtype, T* dst, std::size_t n, cudaStream_t s = 0) {
  if (n == 0) return;
  k_convert<T><<<std::min<unsigned>(blocks_for(n, 256), 65535u), 256, 0, s>>>(src, static_cast<int>(src_dtype), dst, n);
  FPF_CUDA_LAUNCH("convert");
}

// ---------------------------------------------------------------------------------------------------------------
// A step's exchange with the host as a kernel: n 32-bit words from src to dst, one of them page-locked host memory
// (cudaMallocHost's, which the device reads and writes directly under unified addressing). A decode step's graph
// uploads its metadata and reads its results back this way: with copy nodes to and from host memory instead, the
// graph's launch call took ~20 us longer on the H100 machine (docs/cuda.md, session 11). After pdl_wait: the words
// the read-back copies are written by the kernels before it.
// ---------------------------------------------------------------------------------------------------------------
inline constexpr int kCopyWordsThreads = 256;
template <class Word>
__global__ void __launch_bounds__(kCopyWordsThreads) k_copy_words(const Word* __restrict__ src, Word* __restrict__ dst, std::size_t n) {
  pdl_begin();
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = src[i];
}
inline void copy_words(const void* src, void* dst, std::size_t n, cudaStream_t s) {
  if (n == 0) return;
  const std::size_t blocks = std::min<std::size_t>((n + 4 * kCopyWordsThreads - 1) / (4 * kCopyWordsThreads), 128);
  launch("copy_words", k_copy_words<std::uint32_t>, static_cast<unsigned>(blocks), kCopyWordsThreads, 0, s,
         static_cast<const std::uint32_t*>(src), static_cast<std::uint32_t*>(dst), n);
}

// ---------------------------------------------------------------------------------------------------------------
// embedding gather: x[r] = table[id_r], id_r = ids[r], or words[src[r]] where src (optional) has src[r] >= 0 (a
// token computed on the device: the backend's pipelined step takes the argmax of the step before). An id outside
// [0, vocab) reads row 0 (the host rejects such a token before it could be adopted).
// ---------------------------------------------------------------------------------------------------------------
template <class T>
__global__ void k_embed(const std::int32_t* __restrict__ ids, const std::int32_t* __restrict__ src,
                        const std::int32_t* __restrict__ words, const T* __restrict__ table, T* __restrict__ x, int H,
                        int vocab) {
  pdl_begin();
  const std::size_t r = blockIdx.x;
  const int from = src != nullptr ? src[r] : -1;
  int id = from >= 0 ? words[from] : ids[r];
  if (id < 0 || id >= vocab) id = 0;
  const T* row = table + static_cast<std::size_t>(id) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) x[r * H + i] = row[i];
}
template <class T>
void embed(const std::int32_t* ids, const std::int32_t* src, const std::int32_t* words, int rows, const T* table, T* x,
           int H, int vocab, cudaStream_t s = 0) {
  if (rows == 0) return;
  launch("embed", k_embed<T>, rows, 256, 0, s, ids, src, words, table, x, H, vocab);
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)); the mean of squares in double as the CPU reference. Optional row
// map: row r of y is row rows[r] of x.
// ---------------------------------------------------------------------------------------------------------------
// The second half of an RMSNorm row, given its sum of squares (double, fixed order): y = w * (x * rsqrt(mean + eps)).
// A row of n elements over one block, held in registers: thread t holds elements t, t + blockDim, ... (kRowPer of
// them; longer rows continue in a loop that reloads). The sum of squares is taken in double in that order per
// thread, then over the block by block_sum: the order k_rmsnorm has always used, with each element loaded once.
inline constexpr int kRowPer = 8;

// The norm weights of the thread's first kRowPer elements. No kernel writes them: the kernels load them before
// pdl_wait, so that after it only x is a round trip to memory.
__device__ __forceinline__ void norm_weights(const float* __restrict__ w, int n, float (&wv)[kRowPer]) {
#pragma unroll
  for (int u = 0; u < kRowPer; ++u) {
    const int i = threadIdx.x + u * blockDim.x;
    wv[u] = i < n ? w[i] : 0.0f;
  }
}
// wv: norm_weights(w); w for the elements past kRowPer per thread.
template <class T>
__device__ __forceinline__ void rmsnorm_finish(const float (&v)[kRowPer], const float (&wv)[kRowPer], const T* xr,
                                               const float* __restrict__ w, T* __restrict__ yr, int n, double ss, float eps) {
  const float mean = static_cast<float>(ss / static_cast<double>(n));
  const float inv = 1.0f / sqrtf(mean + eps);
#pragma unroll
  for (int u = 0; u < kRowPer; ++u) {
    const int i = threadIdx.x + u * blockDim.x;
    if (i < n) yr[i] = from_f<T>(wv[u] * (v[u] * inv));
  }
  for (int i = threadIdx.x + kRowPer * blockDim.x; i < n; i += blockDim.x) yr[i] = from_f<T>(w[i] * (to_f(xr[i]) * inv));
}
// A signal tap's fp32 copy of the rows a kernel reads or writes (the backend's capture, DESIGN.md "Signals"), taken
// inside that kernel instead of by a launch of its own: row r of the kernel goes to dst + slot(r) * width, where
// slot(r) = slots[r] (no copy when < 0) or r when slots is null. dst null: no tap. The copy is the T value widened.
// The slots are written by the host before the step, by no kernel: a kernel looks its row up before pdl_wait, so
// the lookup is not on the step's critical path.
struct TapOut {
  float* dst = nullptr;
  const std::int32_t* slots = nullptr;
  __device__ __forceinline__ float* row(int r, int width) const {
    if (dst == nullptr) return nullptr;
    const int at = slots != nullptr ? slots[r] : r;
    return at < 0 ? nullptr : dst + static_cast<std::size_t>(at) * width;
  }
};

template <class T>
__global__ void k_rmsnorm(const T* __restrict__ x, const std::int32_t* __restrict__ rows, const float* __restrict__ w,
                          T* __restrict__ y, int n, float eps, TapOut tap) {
  float* const t = tap.row(blockIdx.x, n);
  const std::size_t src = rows ? static_cast<std::size_t>(rows[blockIdx.x]) : blockIdx.x;  // the host's, as the tap's
  float wv[kRowPer];
  norm_weights(w, n, wv);
  pdl_begin();
  __shared__ double scratch[32];
  const T* xr = x + src * n;
  float v[kRowPer];
#pragma unroll
  for (int u = 0; u < kRowPer; ++u) {
    const int i = threadIdx.x + u * blockDim.x;
    v[u] = i < n ? to_f(xr[i]) : 0.0f;
  }
  double ss = 0.0;
#pragma unroll
  for (int u = 0; u < kRowPer; ++u) ss += static_cast<double>(v[u]) * v[u];
  for (int i = threadIdx.x + kRowPer * blockDim.x; i < n; i += blockDim.x) {
    const double d = to_f(xr[i]);
    ss += d * d;
  }
  rmsnorm_finish(v, wv, xr, w, y + static_cast<std::size_t>(blockIdx.x) * n, n, block_sum(ss, scratch), eps);
  if (t != nullptr) {
#pragma unroll
    for (int u = 0; u < kRowPer; ++u) {
      const int i = threadIdx.x + u * blockDim.x;
      if (i < n) t[i] = v[u];
    }
    for (int i = threadIdx.x + kRowPer * blockDim.x; i < n; i += blockDim.x) t[i] = to_f(xr[i]);
  }
}
// y[i] = rmsnorm(x[rows ? rows[i] : i]); tap (optional): x's rows in fp32, block i as row i.
template <class T>
void rmsnorm(const T* x, const std::int32_t* rows, const float* w, T* y, int nrows, int n, float eps, cudaStream_t s = 0,
             TapOut tap = {}) {
  if (nrows == 0) return;
  launch("rmsnorm", k_rmsnorm<T>, nrows, 256, 0, s, x, rows, w, y, n, eps, tap);
}

// The residual add and the next RMSNorm of one row over one block: x + y (rounded to T, as add), written back to xw
// when xw is not null, then out = rmsnorm(x + y) exactly as k_rmsnorm computes it. wv: norm_weights(w). xw null
// needs n <= kRowPer * blockDim (the tail past that would read the sum back from xw).
template <class T>
__device__ __forceinline__ void add_rmsnorm_row(const T* xr, const T* __restrict__ yr, T* xw, const float* __restrict__ w,
                                                const float (&wv)[kRowPer], T* __restrict__ out, int n, float eps,
                                                double* scratch) {
  float v[kRowPer];
#pragma unroll
  for (int u = 0; u < kRowPer; ++u) {
    const int i = threadIdx.x + u * blockDim.x;
    v[u] = i < n ? to_f(from_f<T>(to_f(xr[i]) + to_f(yr[i]))) : 0.0f;
  }
  double ss = 0.0;
#pragma unroll
  for (int u = 0; u < kRowPer; ++u) {
    const int i = threadIdx.x + u * blockDim.x;
    if (xw != nullptr && i < n) xw[i] = from_f<T>(v[u]);  // exact: v[u] is a T value
    ss += static_cast<double>(v[u]) * v[u];
  }
  for (int i = threadIdx.x + kRowPer * blockDim.x; i < n; i += blockDim.x) {
    const T t = from_f<T>(to_f(xr[i]) + to_f(yr[i]));
    xw[i] = t;
    const double d = to_f(t);
    ss += d * d;
  }
  rmsnorm_finish(v, wv, xw, w, out, n, block_sum(ss, scratch), eps);
}

// The residual add and the next RMSNorm in one kernel (one block per row): x += y (rounded to T, as add), then
// y_norm = rmsnorm(x) exactly as k_rmsnorm computes it. Same values as add() then rmsnorm(), one launch fewer.
template <class T>
__global__ void k_add_rmsnorm(T* __restrict__ x, const T* __restrict__ y, const float* __restrict__ w, T* __restrict__ out,
                              int n, float eps) {
  float wv[kRowPer];
  norm_weights(w, n, wv);
  pdl_begin();
  __shared__ double scratch[32];
  T* xr = x + static_cast<std::size_t>(blockIdx.x) * n;
  add_rmsnorm_row(xr, y + static_cast<std::size_t>(blockIdx.x) * n, xr, w, wv, out + static_cast<std::size_t>(blockIdx.x) * n, n,
                  eps, scratch);
}
template <class T>
void add_rmsnorm(T* x, const T* y, const float* w, T* out, int nrows, int n, float eps, cudaStream_t s = 0) {
  if (nrows == 0) return;
  launch("add_rmsnorm", k_add_rmsnorm<T>, nrows, 256, 0, s, x, y, w, out, n, eps);
}

// ---------------------------------------------------------------------------------------------------------------
// Per-head q/k RMSNorm + RoPE (rotate_half), and the KV-cache store. qkv rows are [q heads | k heads | v heads];
// q and k are normalized and rotated in place; k and v are also written to the row's sequence cache at its
// absolute position. One warp per (row, head), 4 heads per block; grid (rows, (nh + nkv) / 4). key_tap (optional):
// the row's normalised, rotated keys (as stored, [nkv * D]) in fp32.
// ---------------------------------------------------------------------------------------------------------------
// Rotates a lane's normalised elements when half = 32 HB (HB = 1, 2, 4: head_dim 64, 128, 256): element u (index
// lane + 32 u) pairs with element u + HB. Same operations, in the same order, as the generic loop of k_qk_norm_rope.
template <int HB, class T>
__device__ __forceinline__ void rope_lane(const float (&xv)[8], const float (&wv)[8], const float (&c)[4], const float (&sn)[4],
                                          float inv, T (&o)[8]) {
#pragma unroll
  for (int u = 0; u < HB; ++u) {
    const float x1 = wv[u] * (xv[u] * inv), x2 = wv[u + HB] * (xv[u + HB] * inv);
    o[u] = from_f<T>(x1 * c[u] - x2 * sn[u]);
    o[u + HB] = from_f<T>(x2 * c[u] + x1 * sn[u]);
  }
}
template <class T>
__global__ void k_qk_norm_rope(T* __restrict__ qkv, const std::int32_t* __restrict__ row_seq,
                               const std::int32_t* __restrict__ row_pos, const float* __restrict__ q_norm,
                               const float* __restrict__ k_norm, const float* __restrict__ inv_freq,
                               T* const* __restrict__ kcache, T* const* __restrict__ vcache, int nh, int nkv, int D,
                               float eps, TapOut key_tap) {
  constexpr int kPer = 8;  // head_dim <= 256: lane holds elements lane + 32 u
  const int r = blockIdx.x, hd = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31, half = D / 2;
  const int q_dim = nh * D, kv_dim = nkv * D;
  // Before pdl_wait, what no kernel writes: the row's metadata and cache pointers (the host's), the norm weights and
  // the rotation's cos / sin. After it one round trip, the loads of q or k and v, when half is a multiple of 32.
  const bool is_k = hd >= nh && hd < nh + nkv, is_q = hd < nh;
  float* kt = is_k ? key_tap.row(r, kv_dim) : nullptr;
  const int p = row_pos[r];
  T* const kc0 = is_k ? kcache[row_seq[r]] : nullptr;
  T* const vc0 = is_k ? vcache[row_seq[r]] : nullptr;
  const float* w = is_q ? q_norm : k_norm;
  const float pos = static_cast<float>(p);
  const int hb = half % 32 == 0 && half <= 128 ? half / 32 : 0;  // 0: the generic loop
  float wv[kPer] = {}, c[4] = {}, sn[4] = {};
  if (hb != 0 && hd < nh + nkv) {
#pragma unroll
    for (int u = 0; u < kPer; ++u)
      if (lane + 32 * u < D) wv[u] = w[lane + 32 * u];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (u < hb) {
        const float angle = pos * inv_freq[lane + 32 * u];
        c[u] = cosf(angle), sn[u] = sinf(angle);
      }
  }
  pdl_begin();
  if (hd >= nh + nkv) return;
  T* row = qkv + static_cast<std::size_t>(r) * (q_dim + 2 * kv_dim);
  const int kvh = hd - nh;
  T* x = is_q ? row + hd * D : row + q_dim + kvh * D;
  const T* v = row + q_dim + kv_dim + kvh * D;
  float xv[kPer], vv[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = lane + 32 * u;
    xv[u] = i < D ? to_f(x[i]) : 0.0f;
    vv[u] = !is_q && i < D ? to_f(v[i]) : 0.0f;
  }
  double ss = 0.0;
#pragma unroll
  for (int u = 0; u < kPer; ++u) ss += static_cast<double>(xv[u]) * xv[u];
  ss = warp_sum(ss);
  const float mean = static_cast<float>(ss / static_cast<double>(D));
  const float inv = 1.0f / sqrtf(mean + eps);
  T o[kPer];  // the rotated elements (hb != 0)
  if (hb == 1) rope_lane<1>(xv, wv, c, sn, inv, o);
  else if (hb == 2) rope_lane<2>(xv, wv, c, sn, inv, o);
  else if (hb == 4) rope_lane<4>(xv, wv, c, sn, inv, o);
  if (hb != 0) {
#pragma unroll
    for (int u = 0; u < kPer; ++u)
      if (lane + 32 * u < D) x[lane + 32 * u] = o[u];
  } else {
    __syncwarp();  // every lane has read x before any lane overwrites it
    for (int i = lane; i < half; i += 32) {
      const float x1 = w[i] * (to_f(x[i]) * inv), x2 = w[i + half] * (to_f(x[i + half]) * inv);
      const float angle = pos * inv_freq[i];
      const float cc = cosf(angle), ss2 = sinf(angle);
      x[i] = from_f<T>(x1 * cc - x2 * ss2);
      x[i + half] = from_f<T>(x2 * cc + x1 * ss2);
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kPer; ++u)
      if (lane + 32 * u < D) o[u] = x[lane + 32 * u];
  }
  if (is_q) return;
  const std::size_t at = static_cast<std::size_t>(p) * kv_dim + kvh * D;
  T* kc = kc0 + at;
  T* vc = vc0 + at;
  if (kt != nullptr) kt += kvh * D;
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = lane + 32 * u;
    if (i < D) {
      kc[i] = o[u], vc[i] = from_f<T>(vv[u]);
      if (kt != nullptr) kt[i] = to_f(o[u]);
    }
  }
}
template <class T>
void qk_norm_rope(T* qkv, const std::int32_t* row_seq, const std::int32_t* row_pos, int rows, const float* q_norm,
                  const float* k_norm, const float* inv_freq, T* const* kcache, T* const* vcache, int nh, int nkv, int D,
                  float eps, cudaStream_t s = 0, TapOut key_tap = {}) {
  if (rows == 0) return;
  constexpr int kWarps = 4;  // (row, head) pairs per block
  launch("qk_norm_rope", k_qk_norm_rope<T>, dim3(rows, (nh + nkv + kWarps - 1) / kWarps), 32 * kWarps, 0, s, qkv, row_seq,
         row_pos, q_norm, k_norm, inv_freq, kcache, vcache, nh, nkv, D, eps, key_tap);
}

// ---------------------------------------------------------------------------------------------------------------
// x += y (the residual add; rounded once to T)
// ---------------------------------------------------------------------------------------------------------------
template <class T>
__global__ void k_add(T* __restrict__ x, const T* __restrict__ y, std::size_t n) {
  pdl_begin();
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x)
    x[i] = from_f<T>(to_f(x[i]) + to_f(y[i]));
}
template <class T>
void add(T* x, const T* y, std::size_t n, cudaStream_t s = 0) {
  if (n == 0) return;
  launch("add", k_add<T>, std::min<unsigned>(blocks_for(n, 256), 65535u), 256, 0, s, x, y, n);
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU activation: a[r, i] = silu(gu[r, i]) * gu[r, I + i] (gate rows first, as gate_up_proj)
// ---------------------------------------------------------------------------------------------------------------
// silu(g) * u in fp32 (g and u already rounded to T): shared with the fused 4-bit gate_up (q::k_qgemv32), so that
// both give the same bits.
__device__ __forceinline__ float swiglu_value(float g, float u) { return g / (1.0f + expf(-g)) * u; }
template <class T>
__global__ void k_swiglu(const T* __restrict__ gu, T* __restrict__ a, std::size_t rows, int I) {
  pdl_begin();
  const std::size_t n = rows * I;
  for (std::size_t idx = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; idx < n; idx += std::size_t{gridDim.x} * blockDim.x) {
    const std::size_t r = idx / I, i = idx % I;
    const float g = to_f(gu[r * 2 * I + i]), u = to_f(gu[r * 2 * I + I + i]);
    a[idx] = from_f<T>(swiglu_value(g, u));
  }
}
template <class T>
void swiglu(const T* gu, T* a, std::size_t rows, int I, cudaStream_t s = 0) {
  if (rows == 0) return;
  launch("swiglu", k_swiglu<T>, std::min<unsigned>(blocks_for(rows * I, 256), 65535u), 256, 0, s, gu, a, rows, I);
}

// ---------------------------------------------------------------------------------------------------------------
// Router: softmax over E experts in fp32, top-k (ties to the lower expert id), optional renormalisation (the sum
// taken in selection order, as the CPU reference), output sorted by expert id ascending (the order the outputs
// are summed in). One block per row; smem E floats.
// ---------------------------------------------------------------------------------------------------------------
inline constexpr int kRouteMaxK = 64;       // the most experts per token the CUDA router picks
inline constexpr int kRouterThreads = 128;  // k_router's block
// Shared memory of route_row: p (E floats, the caller's), the picks and a reduction scratch.
struct RouteSmem {
  int sel[kRouteMaxK];
  float selw[kRouteMaxK];
  float red[32];
};
// One row's routing by the whole block (every thread calls it; blockDim.x a multiple of 32). logit(e): expert e's
// logit as float.
//   1. p = softmax: the max over the block (exact in any order), exp(logit - max) per expert, the sum by warp 0 in
//      one fixed order (lane l adds experts l, l + 32, ... in ascending order, then warp_sum's butterfly), p / sum.
//   2. The picks by rank: expert e's rank is the number of experts j with p_j > p_e, or p_j = p_e and j < e (NaN
//      ranks below every number); rank r < k is pick r. So pick r is what the r-th round of an arg-max with ties
//      to the lower id would take, in parallel.
//   3. Renormalised by the picks' sum in pick order; pick r goes to its rank among the picked ids.
// Ends with __syncthreads (the caller may reuse p and sm).
template <class Logit>
__device__ void route_row(Logit logit, int E, int k, int norm, float* p, RouteSmem& sm, std::int32_t* __restrict__ ids,
                          float* __restrict__ wts) {
  const int tid = threadIdx.x, nt = blockDim.x;
  float m = -INFINITY;
  for (int e = tid; e < E; e += nt) m = fmaxf(m, p[e] = logit(e));  // each logit read once
  m = block_max(m, sm.red);
  for (int e = tid; e < E; e += nt) p[e] = expf(p[e] - m);
  __syncthreads();
  if (tid < 32) {
    float sum = 0.0f;
    for (int e = tid; e < E; e += 32) sum += p[e];
    sum = warp_sum(sum);
    if (tid == 0) sm.red[0] = sum;
  }
  __syncthreads();
  const float sum = sm.red[0];
  for (int e = tid; e < E; e += nt) p[e] = p[e] / sum;
  __syncthreads();
  for (int e = tid; e < E; e += nt) {
    const float v = p[e], key = v >= 0.0f ? v : -1.0f;  // p >= 0; NaN below every number
    int r = 0;
#pragma unroll 8
    for (int j = 0; j < E; ++j) {
      const float u = p[j], uk = u >= 0.0f ? u : -1.0f;
      r += (uk > key || (uk == key && j < e)) ? 1 : 0;
    }
    if (r < k) sm.sel[r] = e, sm.selw[r] = v;
  }
  __syncthreads();
  float tot = 0.0f;
  if (norm)
    for (int s = 0; s < k; ++s) tot += sm.selw[s];
  for (int s = tid; s < k; s += nt) {
    const int id = sm.sel[s];
    int pos = 0;
    for (int t = 0; t < k; ++t) pos += sm.sel[t] < id ? 1 : 0;
    ids[pos] = id;
    wts[pos] = norm ? sm.selw[s] / tot : sm.selw[s];
  }
  __syncthreads();
}

// route_row by one warp, in registers, for E <= kRouteWarpMaxE and k <= 32: the same picks, order and weights
// (tested against route_row bit for bit) without a block barrier. Lane l holds experts l, l + 32, l + 64, l + 96.
//   1. p = softmax as route_row: the max (exact in any order), exp(logit - max), the sum as route_row's warp 0 takes
//      it (lane l adds its experts in ascending order, then warp_sum), p / sum.
//   2. k rounds of an arg-max over the unpicked experts, p descending, ties to the lower id, NaN below every number:
//      each lane's experts sorted by key once; __reduce_max_sync takes the best first key, __reduce_min_sync the
//      lowest id holding it, its lane drops it. Round r's pick is route_row's rank-r pick.
//   3. Lane r keeps pick r; the renormalising sum in pick order and each pick's place among the picked ids by
//      shuffles, as route_row.
// Every lane of the warp calls it.
inline constexpr int kRouteWarpMaxE = 128;
template <class Logit>
__device__ void route_row_warp(Logit logit, int E, int k, int norm, std::int32_t* __restrict__ ids, float* __restrict__ wts) {
  constexpr int J = kRouteWarpMaxE / 32;
  const int lane = threadIdx.x & 31;
  // Branch-free, so that the four experts' chains interleave (one warp runs this alone: its time is its latency;
  // with a branch per expert the softmax took ~4000 cycles). An expert past E reads as -inf (the max is unchanged)
  // and adds +0 to the sum after the lane's real experts (the sum's bits are unchanged).
  float v[J];
  float m = -INFINITY;
  unsigned left = 0;  // bit j: expert lane + 32 j is a real one (< E)
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const bool real = lane + 32 * j < E;
    v[j] = real ? logit(lane + 32 * j) : -INFINITY;
    m = fmaxf(m, v[j]);
    left |= real ? 1u << j : 0u;
  }
  m = warp_max(m);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < J; ++j) v[j] = expf(v[j] - m);
#pragma unroll
  for (int j = 0; j < J; ++j) sum += (left >> j) & 1u ? v[j] : 0.0f;
  sum = warp_sum(sum);
  // Keys: 0 for an expert past E (never picked: k <= E), 1 for NaN, p's bits + 2 (p >= 0: the bits order as the
  // values). The lane's four sorted by (key descending, id ascending), a total order, so its best unpicked expert is
  // always its first: a round is two warp reductions and a shift.
  unsigned key[J], id[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    v[j] = v[j] / sum;
    key[j] = (left >> j) & 1u ? (v[j] >= 0.0f ? __float_as_uint(v[j]) + 2u : 1u) : 0u;
    id[j] = static_cast<unsigned>(lane + 32 * j);
  }
  auto order = [&](int a, int b) {  // a before b
    if (key[b] > key[a] || (key[b] == key[a] && id[b] < id[a])) {
      const unsigned tk = key[a], ti = id[a];
      const float tv = v[a];
      key[a] = key[b], id[a] = id[b], v[a] = v[b];
      key[b] = tk, id[b] = ti, v[b] = tv;
    }
  };
  order(0, 1), order(2, 3), order(0, 2), order(1, 3), order(1, 2);
  int pick = 0;
  float pick_w = 0.0f;
  for (int r = 0; r < k; ++r) {
    const unsigned top = __reduce_max_sync(0xffffffffu, key[0]);
    const unsigned pid = __reduce_min_sync(0xffffffffu, key[0] == top ? id[0] : 0xffffffffu);
    const int owner = static_cast<int>(pid & 31u);
    const float w = __shfl_sync(0xffffffffu, v[0], owner);
    if (lane == owner) {
#pragma unroll
      for (int j = 0; j + 1 < J; ++j) key[j] = key[j + 1], id[j] = id[j + 1], v[j] = v[j + 1];
      key[J - 1] = 0u;
    }
    if (lane == r) pick = static_cast<int>(pid), pick_w = w;
  }
  float tot = 0.0f;
  int pos = 0;
  for (int s = 0; s < k; ++s) {
    if (norm) tot += __shfl_sync(0xffffffffu, pick_w, s);
    pos += __shfl_sync(0xffffffffu, pick, s) < pick ? 1 : 0;
  }
  if (lane < k) ids[pos] = pick, wts[pos] = norm ? pick_w / tot : pick_w;
}

// One block per row; smem E floats.
template <class T>
__global__ void __launch_bounds__(kRouterThreads) k_router(const T* __restrict__ logits, int E, int k, int norm,
                                                          std::int32_t* __restrict__ ids, float* __restrict__ wts) {
  pdl_begin();
  extern __shared__ float p[];
  __shared__ RouteSmem sm;
  const int r = blockIdx.x;
  const T* x = logits + static_cast<std::size_t>(r) * E;
  route_row([&](int e) { return to_f(x[e]); }, E, k, norm, p, sm, ids + r * k, wts + r * k);
}
template <class T>
void router(const T* logits, int rows, int E, int k, bool norm, std::int32_t* ids, float* wts, cudaStream_t s = 0) {
  if (rows == 0) return;
  if (k > kRouteMaxK || k > E)
    throw Error("config.json: num_experts_per_tok",
                "the CUDA router supports at most " + std::to_string(kRouteMaxK) + ", and at most num_experts");
  launch("router", k_router<T>, rows, kRouterThreads, E * sizeof(float), s, logits, E, k, norm ? 1 : 0, ids, wts);
}

// The combine's residual add: x + T(y), rounded to T (shared with the fused 4-bit down, q::k_qgemv32).
template <class T>
__device__ __forceinline__ T combine_into(T x, float y) {
  return from_f<T>(to_f(x) + to_f(from_f<T>(y)));
}

// ---------------------------------------------------------------------------------------------------------------
// MoE combine + residual: y = sum_s wts[r,s] * ye[slot(r,s)] in slot order (expert id ascending), then
// x[r] += T(y). slot(r,s) = slot_row[r*k+s], or r*k+s when slot_row is null.
// ---------------------------------------------------------------------------------------------------------------
template <class T>
__global__ void k_moe_combine(T* __restrict__ x, const T* __restrict__ ye, const std::int32_t* __restrict__ slot_row,
                              const float* __restrict__ wts, int k, int H) {
  pdl_begin();
  const int r = blockIdx.x;
  for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < H; j += gridDim.y * blockDim.x) {
    float y = 0.0f;
    for (int s = 0; s < k; ++s) {
      const std::size_t row = slot_row ? slot_row[r * k + s] : static_cast<std::size_t>(r) * k + s;
      y = fmaf(to_f(ye[row * H + j]), wts[r * k + s], y);  // as q::Weight::moe_gemv_combine
    }
    T* xr = x + static_cast<std::size_t>(r) * H;
    xr[j] = combine_into(xr[j], y);
  }
}
template <class T>
void moe_combine(T* x, const T* ye, const std::int32_t* slot_row, const float* wts, int rows, int k, int H, cudaStream_t s = 0) {
  if (rows == 0) return;
  launch("moe_combine", k_moe_combine<T>, dim3(rows, blocks_for(static_cast<std::size_t>(H), 256)), 256, 0, s, x, ye, slot_row, wts, k, H);
}

// ---------------------------------------------------------------------------------------------------------------
// Prefill MoE grouping on the device: a stable counting sort of the P slots by expert (ascending expert, then
// ascending slot), in one block of kGroupThreads threads. Warp w takes the contiguous slots [w P/nw, (w+1) P/nw),
// 32 at a time; lanes holding the same expert find each other with __match_any_sync and rank themselves by lane.
// Pass 1 counts per (warp, expert); a scan in (expert, warp) order gives every warp's first position per expert; pass
// 2 walks the same slots again and writes the positions. Integer counts only: the result is the unique stable
// order, whatever the timing. With pad (allowed and E * Mmax <= 2 P, Mmax the largest count) expert e's rows start at e * Mmax
// and rows past its count are -1 (zero rows for the padded batched product); else they start at offsets[e].
//   out: rows [grouped row -> slot or -1] (G entries), slot_row [slot -> grouped row] (P), info [E + 1 offsets, Mmax,
//   pad]
// ---------------------------------------------------------------------------------------------------------------
inline constexpr int kGroupThreads = 1024, kGroupMaxExperts = 256;

template <class = void>  // a template, so that every translation unit may define it
__global__ void __launch_bounds__(kGroupThreads) k_route_group(const std::int32_t* __restrict__ ids, int P, int E,
                                                               std::int32_t* __restrict__ rows,
                                                               std::int32_t* __restrict__ slot_row,
                                                               std::int32_t* __restrict__ info, int allow_pad) {
  pdl_begin();
  constexpr int nw = kGroupThreads / 32;
  __shared__ int hist[nw][kGroupMaxExperts];  // pass 1: counts; then each warp's next position per expert
  __shared__ int tot[kGroupMaxExperts + 1];
  __shared__ int mmax_pad[2];
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned lt = (1u << lane) - 1u;
  for (int i = threadIdx.x; i < nw * kGroupMaxExperts; i += blockDim.x) (&hist[0][0])[i] = 0;
  __syncthreads();
  const int per = (P + nw - 1) / nw, b = min(P, w * per), e_end = min(P, b + per);
  for (int base = b; base < e_end; base += 32) {
    const int p = base + lane;
    const int id = p < e_end ? ids[p] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, id);
    if (id >= 0 && (peers & lt) == 0) hist[w][id] += __popc(peers);  // the lowest lane of the group
    __syncwarp();
  }
  __syncthreads();
  // Totals per expert, their exclusive scan (offsets), the largest count.
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int t = 0;
    for (int v = 0; v < nw; ++v) t += hist[v][e];
    tot[e] = t;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0, mx = 0;
    for (int e = 0; e < E; ++e) {
      const int t = tot[e];
      tot[e] = run;
      run += t;
      mx = max(mx, t);
    }
    tot[E] = run;
    mmax_pad[0] = mx;
    mmax_pad[1] = allow_pad && static_cast<long long>(E) * mx <= 2LL * P ? 1 : 0;
  }
  __syncthreads();
  const int mx = mmax_pad[0], pad = mmax_pad[1];
  // Each warp's first position per expert: the expert's start, plus the earlier warps' counts.
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int at = pad ? e * mx : tot[e];
    for (int v = 0; v < nw; ++v) {
      const int c = hist[v][e];
      hist[v][e] = at;
      at += c;
    }
  }
  if (pad)
    for (int i = threadIdx.x; i < E * mx; i += blockDim.x) rows[i] = -1;
  if (threadIdx.x <= E) info[threadIdx.x] = tot[threadIdx.x];
  if (threadIdx.x == 0) info[E + 1] = mx, info[E + 2] = pad;
  __syncthreads();
  for (int base = b; base < e_end; base += 32) {
    const int p = base + lane;
    const int id = p < e_end ? ids[p] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, id);
    if (id >= 0) {
      const int at = hist[w][id] + __popc(peers & lt);
      rows[at] = p;
      slot_row[p] = at;
    }
    __syncwarp();
    if (id >= 0 && (peers & lt) == 0) hist[w][id] += __popc(peers);
    __syncwarp();
  }
}
// ids: [P] expert of each slot (the router's output). rows must hold 2 P entries (P without allow_pad), info E + 3.
inline void route_group(const std::int32_t* ids, int P, int E, std::int32_t* rows, std::int32_t* slot_row, std::int32_t* info,
                        bool allow_pad, cudaStream_t s = 0) {
  if (E > kGroupMaxExperts || E + 1 > kGroupThreads)
    throw Error("config.json: num_experts", "the CUDA MoE grouping supports at most " + std::to_string(kGroupMaxExperts));
  launch("route_group", k_route_group<>, 1, kGroupThreads, 0, s, ids, P, E, rows, slot_row, info, allow_pad ? 1 : 0);
}

// dst[i] = src[rows[i] / src_div] (rows of n elements; rows[i] / src_div: the token of slot rows[i]); rows[i] < 0:
// a row of zeros (padding). V: elements per copy (a 16-byte Vec when the rows allow it).
template <class T, int V>
__global__ void k_gather(const T* __restrict__ src, const std::int32_t* __restrict__ rows, int src_div, T* __restrict__ dst, int n) {
  pdl_begin();
  struct alignas(V * sizeof(T)) Piece {
    T v[V];
  };
  const std::int32_t slot = rows[blockIdx.x];
  Piece* d = reinterpret_cast<Piece*>(dst + static_cast<std::size_t>(blockIdx.x) * n);
  if (slot < 0) {
    Piece z;
#pragma unroll
    for (int i = 0; i < V; ++i) z.v[i] = from_f<T>(0.0f);
    for (int j = threadIdx.x; j < n / V; j += blockDim.x) d[j] = z;
    return;
  }
  const Piece* s = reinterpret_cast<const Piece*>(src + static_cast<std::size_t>(slot / src_div) * n);
  for (int j = threadIdx.x; j < n / V; j += blockDim.x) d[j] = s[j];
}
template <class T>
void gather(const T* src, const std::int32_t* rows, int src_div, int nrows, T* dst, int n, cudaStream_t s = 0) {
  if (nrows == 0) return;
  constexpr int V = 16 / sizeof(T);
  if (n % V == 0 && reinterpret_cast<std::uintptr_t>(src) % 16 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 16 == 0)
    launch("gather", k_gather<T, V>, nrows, 256, 0, s, src, rows, src_div, dst, n);
  else
    launch("gather", k_gather<T, 1>, nrows, 256, 0, s, src, rows, src_div, dst, n);
}

// ---------------------------------------------------------------------------------------------------------------
// Small-M matrix-vector products (decode): one warp per output row n; each lane walks its 16-byte chunks of the
// row in order, then a butterfly sums the lanes. Y[m, n] = sum_k X[m, k] W[n, k]; W row-major [N, K].
// ---------------------------------------------------------------------------------------------------------------
// 16 bytes of T. alignas(16) lets a copy be one 128-bit load (without it the copy is split into 2-byte loads for
// bf16/fp16: 8 instructions instead of 1).
template <class T>
struct alignas(16) Vec {
  static constexpr int n = 16 / sizeof(T);
  T v[n];
};

// dot_rows' sums over one batch of a lane's chunks: acc[m] += w_c . x_m (chunk c) for c = c0 + 32 u, u < U, in
// that order (also add_rmsnorm_router's router logits, so that both give the same bits).
template <class T, int M, int U>
__device__ __forceinline__ void dot_batch(const Vec<T> (&wv)[U], const T* __restrict__ x, std::size_t x_stride, int c0,
                                          int chunks, float (&acc)[M]) {
  constexpr int V = Vec<T>::n;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + 32 * u;
    if (c >= chunks) break;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const Vec<T> xv = reinterpret_cast<const Vec<T>*>(x + m * x_stride)[c];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[m] += to_f(wv[u].v[i]) * to_f(xv.v[i]);
    }
  }
}
// Wait: pdl_wait, called after the lane's first weight loads are issued (weights are written by no kernel, x may be),
// so they overlap the earlier kernel's tail. A lane with no chunk of the row does not wait here: the caller waits
// after (again, for the others: it then returns at once).
template <class T, int M, bool Vectorized, bool Wait = false>
__device__ __forceinline__ void dot_rows(const T* __restrict__ w, const T* __restrict__ x, std::size_t x_stride, int K,
                                         float (&acc)[M]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  if constexpr (Vectorized) {
    constexpr int V = Vec<T>::n;
    // Wait: a lane's first U weight loads are all issued before the wait and their products (same sum order).
    constexpr int U = Wait ? 8 : 1;
    const int chunks = K / V;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
      Vec<T> wv[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (c0 + 32 * u < chunks) wv[u] = reinterpret_cast<const Vec<T>*>(w)[c0 + 32 * u];
      if constexpr (Wait)
        if (c0 == lane) pdl_wait();
      dot_batch<T, M, U>(wv, x, x_stride, c0, chunks, acc);
    }
  } else {
    if constexpr (Wait) pdl_wait();
    for (int i = lane; i < K; i += 32) {
      const float wv = to_f(w[i]);
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] += wv * to_f(x[m * x_stride + i]);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
}

template <class T, int M, bool Vectorized>
__global__ void k_gemv(const T* __restrict__ X, const T* __restrict__ W, int N, int K, T* __restrict__ Y) {
  pdl_begin();
  const int n = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (n >= N) return;
  float acc[M];
  dot_rows<T, M, Vectorized>(W + static_cast<std::size_t>(n) * K, X, K, K, acc);
  if ((threadIdx.x & 31) == 0)
#pragma unroll
    for (int m = 0; m < M; ++m) Y[static_cast<std::size_t>(m) * N + n] = from_f<T>(acc[m]);
}

template <class T>
bool vectorizable(const void* a, const void* b, int K) {
  return K % Vec<T>::n == 0 && reinterpret_cast<std::uintptr_t>(a) % 16 == 0 && reinterpret_cast<std::uintptr_t>(b) % 16 == 0;
}

inline constexpr int kGemvMaxRows = 8;

template <class T, int M>
void gemv_m(const T* X, const T* W, int N, int K, T* Y, cudaStream_t s) {
  const unsigned blocks = blocks_for(static_cast<std::size_t>(N), 8);
  if (vectorizable<T>(X, W, K)) launch("gemv", k_gemv<T, M, true>, blocks, 256, 0, s, X, W, N, K, Y);
  else launch("gemv", k_gemv<T, M, false>, blocks, 256, 0, s, X, W, N, K, Y);
}

// Y[M, N] = X[M, K] W[N, K]^T for M <= kGemvMaxRows.
template <class T>
void gemv(const T* X, int M, const T* W, int N, int K, T* Y, cudaStream_t s = 0) {
  switch (M) {
    case 0: return;
    case 1: return gemv_m<T, 1>(X, W, N, K, Y, s);
    case 2: return gemv_m<T, 2>(X, W, N, K, Y, s);
    case 3: return gemv_m<T, 3>(X, W, N, K, Y, s);
    case 4: return gemv_m<T, 4>(X, W, N, K, Y, s);
    case 5: return gemv_m<T, 5>(X, W, N, K, Y, s);
    case 6: return gemv_m<T, 6>(X, W, N, K, Y, s);
    case 7: return gemv_m<T, 7>(X, W, N, K, Y, s);
    case 8: return gemv_m<T, 8>(X, W, N, K, Y, s);
    default: throw Error("gemv", "at most " + std::to_string(kGemvMaxRows) + " rows");
  }
}

// Per-slot expert products (decode MoE): for slot p, Y[p] = W[ids[p]] X[p / x_div]; W is [E, N, K].
template <class T, bool Vectorized>
__global__ void k_moe_gemv(const T* __restrict__ X, int x_div, const T* __restrict__ W, const std::int32_t* __restrict__ ids,
                           int N, int K, T* __restrict__ Y) {
  pdl_begin();
  const int p = blockIdx.y;
  const int n = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (n >= N) return;
  const T* w = W + (static_cast<std::size_t>(ids[p]) * N + n) * K;
  float acc[1];
  dot_rows<T, 1, Vectorized>(w, X + static_cast<std::size_t>(p / x_div) * K, K, K, acc);
  if ((threadIdx.x & 31) == 0) Y[static_cast<std::size_t>(p) * N + n] = from_f<T>(acc[0]);
}
template <class T>
void moe_gemv(const T* X, int x_div, const T* W, const std::int32_t* ids, int slots, int N, int K, T* Y, cudaStream_t s = 0) {
  if (slots == 0) return;
  const dim3 grid(blocks_for(static_cast<std::size_t>(N), 8), slots);
  if (vectorizable<T>(X, W, K) && (static_cast<std::size_t>(N) * K) % Vec<T>::n == 0)
    launch("moe_gemv", k_moe_gemv<T, true>, grid, 256, 0, s, X, x_div, W, ids, N, K, Y);
  else
    launch("moe_gemv", k_moe_gemv<T, false>, grid, 256, 0, s, X, x_div, W, ids, N, K, Y);
}

// ---------------------------------------------------------------------------------------------------------------
// Decode router in one launch: the router logits as gemv (k_gemv's warps, values and rounding to T, written to
// `logits` as well), then the last block to finish (a device counter, reset by that block for the next launch)
// routes each of the M rows as k_router. Same ids and weights as gemv() then router(), one launch fewer. The
// counter only elects the block; every value is computed in one fixed order.
// ---------------------------------------------------------------------------------------------------------------
inline constexpr int kRouterWarps = 8;
template <class T, int M>
__global__ void __launch_bounds__(32 * kRouterWarps) k_router_gemv(const T* __restrict__ X, const T* __restrict__ W, int E, int K,
                                                                  T* logits, int k, int norm, std::int32_t* __restrict__ ids,
                                                                  float* __restrict__ wts, unsigned* counter) {
  extern __shared__ float p[];  // [E]
  __shared__ RouteSmem sm;
  __shared__ bool last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * kRouterWarps + warp;
  if (n < E) {  // the router weights' first loads before pdl_wait (in dot_rows; lanes past the row's chunks wait below)
    float acc[M];
    dot_rows<T, M, true, true>(W + static_cast<std::size_t>(n) * K, X, K, K, acc);
    pdl_begin();
    if (lane == 0)
#pragma unroll
      for (int m = 0; m < M; ++m) logits[static_cast<std::size_t>(m) * E + n] = from_f<T>(acc[m]);
  } else {
    pdl_begin();
  }
  __threadfence();  // this block's logits are visible device-wide before it counts itself done
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int m = 0; m < M; ++m) {
    const T* x = logits + static_cast<std::size_t>(m) * E;
    route_row([&](int e) { return to_f(__ldcg(x + e)); }, E, k, norm, p, sm, ids + m * k, wts + m * k);
  }
  if (threadIdx.x == 0) *counter = 0u;
}
// Expert e's logits of the M rows, rounded to T: into logits [M, E] and, widened, into the cluster block's shared
// memory at lg ([M, E] fp32, a shared::cluster address), where that block routes them (k_router_cluster,
// k_add_rmsnorm_router).
template <class T, int M>
__device__ __forceinline__ void put_logits(const float (&acc)[M], T* __restrict__ logits, std::uint32_t lg, int E, int e) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const T v = from_f<T>(acc[m]);
    logits[static_cast<std::size_t>(m) * E + e] = v;
    cluster_store(lg + 4u * static_cast<std::uint32_t>(m * E + e), to_f(v));
  }
}
// sm_90: the decode router as one thread-block cluster of at most kRouterClusterMax blocks. Each block computes
// the logits of blockDim / 32 experts (k_router_gemv's warps and values), writes them to `logits` and, widened, into
// block 0's shared memory (Hopper's distributed shared memory); the cluster barrier (release, then acquire) makes
// them visible there, and block 0 routes each row as k_router_gemv's last block does, from its own shared memory.
// Same ids and weights, without the device counter, its fences and the logits' round trip through L2.
inline constexpr int kRouterClusterMax = 8, kRouterClusterWarps = 16;  // blocks per cluster (portable), warps per block
template <class T, int M>
__global__ void __launch_bounds__(32 * kRouterClusterWarps)
    k_router_cluster(const T* __restrict__ X, const T* __restrict__ W, int E, int K, T* __restrict__ logits, int k, int norm,
                     std::int32_t* __restrict__ ids, float* __restrict__ wts) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ float p[];  // [E] route_row's scratch, then block 0's [M][E] logits
  __shared__ RouteSmem sm;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * (blockDim.x >> 5) + warp;
  const std::uint32_t lg = cluster_map(p + E, 0);  // block 0's logits
  if (n < E) {  // the router weights' first loads before pdl_wait, as k_router_gemv
    float acc[M];
    dot_rows<T, M, true, true>(W + static_cast<std::size_t>(n) * K, X, K, K, acc);
    pdl_begin();
    if (lane == 0) put_logits<T, M>(acc, logits, lg, E, n);
  } else {
    pdl_begin();
  }
  cluster_sync();
  if (cluster_rank() != 0) return;
  if (E <= kRouteWarpMaxE && k <= 32) {  // by warp 0 alone, no block barrier (docs/cuda.md, session 10)
    if (warp != 0) return;
    for (int m = 0; m < M; ++m) {
      const float* x = p + E + m * E;
      route_row_warp([&](int e) { return x[e]; }, E, k, norm, ids + m * k, wts + m * k);
    }
    return;
  }
  for (int m = 0; m < M; ++m) {
    const float* x = p + E + m * E;
    route_row([&](int e) { return x[e]; }, E, k, norm, p, sm, ids + m * k, wts + m * k);
  }
#endif
}
// Whether router_gemv takes k_router_cluster (else k_router_gemv): on sm_90 for E <= 128. Tests flip it to compare.
inline bool& router_cluster_enabled() {
  static bool on = device_info().major == 9;
  return on;
}

// Whether router_gemv applies (else gemv + router).
template <class T>
bool router_gemv_fits(const T* X, const T* W, int M, int E, int K, int k) {
  return M >= 1 && M <= kGemvMaxRows && k <= kRouteMaxK && k <= E && vectorizable<T>(X, W, K) && E * sizeof(float) <= 32 * 1024;
}
// f(std::integral_constant<int, M>) for the router kernels' row count M, 1..8.
template <class F>
void router_rows(int M, F&& f) {
  switch (M) {
#define FPF_ROUTER_M(MM) \
  case MM: return f(std::integral_constant<int, MM>{});
    FPF_ROUTER_M(1) FPF_ROUTER_M(2) FPF_ROUTER_M(3) FPF_ROUTER_M(4) FPF_ROUTER_M(5) FPF_ROUTER_M(6) FPF_ROUTER_M(7) FPF_ROUTER_M(8)
#undef FPF_ROUTER_M
    default: throw Error("router_gemv", "1 to 8 rows");
  }
}
// counter: one unsigned on the device, 0 before the first launch (k_router_gemv's; the cluster kernel needs none).
template <class T>
void router_gemv(const T* X, int M, const T* W, int E, int K, T* logits, int k, bool norm, std::int32_t* ids, float* wts,
                 unsigned* counter, cudaStream_t s = 0) {
  const int nm = norm ? 1 : 0;
  if (router_cluster_enabled() && E <= kRouterClusterMax * kRouterClusterWarps) {
    const unsigned warps = blocks_for(static_cast<std::size_t>(E), kRouterClusterMax);  // per block
    const unsigned blocks = blocks_for(static_cast<std::size_t>(E), warps);             // <= kRouterClusterMax
    const std::size_t smem = static_cast<std::size_t>(M + 1) * E * sizeof(float);
    return router_rows(M, [&](auto m) {
      launch_ex("router_cluster", k_router_cluster<T, decltype(m)::value>, blocks, blocks, 32 * warps, smem, s, X, W, E, K,
                logits, k, nm, ids, wts);
    });
  }
  const unsigned blocks = blocks_for(static_cast<std::size_t>(E), kRouterWarps);
  const std::size_t smem = static_cast<std::size_t>(E) * sizeof(float);
  router_rows(M, [&](auto m) {
    launch("router_gemv", k_router_gemv<T, decltype(m)::value>, blocks, 32 * kRouterWarps, smem, s, X, W, E, K, logits, k, nm,
           ids, wts, counter);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Decode MoE (sm_90): the residual add, the post-attention RMSNorm and the router in one launch, a thread-block
// cluster of ceil(E / 8) <= 16 blocks (docs/cuda.md, session 13). Same values as add_rmsnorm then router_gemv, one
// launch fewer: the router no longer waits for the norm's launch to end and reads h back from L2.
//   - Every block adds and normalises the M rows itself (add_rmsnorm_row: k_add_rmsnorm's bits) into its shared
//     memory; block 0 writes them to out (the experts' input).
//   - Warp w of block b computes expert 8 b + w's logits as k_router_cluster's warps do (dot_rows' sums; the weights
//     loaded before pdl_wait) from the rows in shared memory, rounded to T, into logits and block 0's shared memory;
//     after the cluster barrier warp 0 of block 0 routes them (route_row_warp) into ids and wts, as k_router_cluster.
//   - x + y is written into x after the cluster barrier, when every block has read x: by every block's warps past
//     the first, a 16-byte piece per thread (off the chain: block 0's warp 0 is routing meanwhile).
// ---------------------------------------------------------------------------------------------------------------
inline constexpr int kNormRouterWarps = 8, kNormRouterMaxBlocks = 16;
template <class T, int M>
__global__ void __launch_bounds__(32 * kNormRouterWarps)
    k_add_rmsnorm_router(T* x, const T* __restrict__ y, const float* __restrict__ w, T* __restrict__ out,
                         const T* __restrict__ W, int E, int n, float eps, T* __restrict__ logits, int k, int norm,
                         std::int32_t* __restrict__ ids, float* __restrict__ wts) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint4 hs_raw[];  // [M][n] T: the normalised rows; then (block 0's) [M][E] fp32: the logits
  T* const hs = reinterpret_cast<T*>(hs_raw);
  float* const lg = reinterpret_cast<float*>(hs + static_cast<std::size_t>(M) * n);
  __shared__ double scratch[32];
  constexpr int V = Vec<T>::n, U = 8;  // dot_rows' batch: a lane's first U weight loads before the wait
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, e = blockIdx.x * kNormRouterWarps + warp, chunks = n / V;
  const Vec<T>* const wr = reinterpret_cast<const Vec<T>*>(W + static_cast<std::size_t>(e < E ? e : 0) * n);
  Vec<T> wb[U];
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (e < E && lane + 32 * u < chunks) wb[u] = wr[lane + 32 * u];
  float nw[kRowPer];
  norm_weights(w, n, nw);
  const std::uint32_t lg0 = cluster_map(lg, 0);  // block 0's logits
  pdl_begin();
  for (int m = 0; m < M; ++m) {
    const std::size_t o = static_cast<std::size_t>(m) * n;
    add_rmsnorm_row<T>(x + o, y + o, nullptr, w, nw, hs + o, n, eps, scratch);
  }
  __syncthreads();
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i < M * chunks; i += blockDim.x) reinterpret_cast<Vec<T>*>(out)[i] = reinterpret_cast<const Vec<T>*>(hs)[i];
  if (e < E) {
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
      if (c0 != lane)
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (c0 + 32 * u < chunks) wb[u] = wr[c0 + 32 * u];
      dot_batch<T, M, U>(wb, hs, static_cast<std::size_t>(n), c0, chunks, acc);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
    if (lane == 0) put_logits<T, M>(acc, logits, lg0, E, e);
  }
  cluster_sync();
  if (warp != 0) {  // x += y, as k_add_rmsnorm writes it (the same T sums)
    const int per = blockDim.x - 32;
    for (int i = blockIdx.x * per + threadIdx.x - 32; i < M * chunks; i += gridDim.x * per) {
      Vec<T> a = reinterpret_cast<const Vec<T>*>(x)[i];
      const Vec<T> b = reinterpret_cast<const Vec<T>*>(y)[i];
#pragma unroll
      for (int j = 0; j < V; ++j) a.v[j] = from_f<T>(to_f(a.v[j]) + to_f(b.v[j]));
      reinterpret_cast<Vec<T>*>(x)[i] = a;
    }
    return;
  }
  if (cluster_rank() != 0) return;
  for (int m = 0; m < M; ++m) {
    const float* l = lg + m * E;
    route_row_warp([&](int j) { return l[j]; }, E, k, norm, ids + m * k, wts + m * k);
  }
#endif
}
// Whether add_rmsnorm_router applies: sm_90 (clusters), M <= 8 rows of n <= 8 * 256 (one pass of add_rmsnorm_row),
// 16-byte rows (x, y, W), E <= 128 (route_row_warp's and 16 blocks' of 8 warps), k <= 32, the rows in 48 KB of
// shared memory.
template <class T>
bool add_rmsnorm_router_fits(const T* x, const T* y, const T* W, int M, int E, int n, int k) {
  const auto a16 = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return device_info().major == 9 && a16(x) && a16(y) && M >= 1 && M <= kGemvMaxRows && E >= 1 && E <= kRouteWarpMaxE &&
         E <= kNormRouterWarps * kNormRouterMaxBlocks && k >= 1 && k <= 32 && k <= E && n % Vec<T>::n == 0 &&
         n <= kRowPer * 32 * kNormRouterWarps && reinterpret_cast<std::uintptr_t>(W) % 16 == 0 &&
         static_cast<std::size_t>(M) * (n * sizeof(T) + E * sizeof(float)) <= 48 * 1024;
}
// x += y, out = rmsnorm(x), logits = out W^T (rounded to T; W [E, n]), and their routing into ids and wts (k per
// row, ascending id, renormalised when norm), for M rows of n: add_rmsnorm then router_gemv, one launch.
template <class T>
void add_rmsnorm_router(T* x, const T* y, const float* w, T* out, int M, int n, float eps, const T* W, int E, T* logits,
                        int k, bool norm, std::int32_t* ids, float* wts, cudaStream_t s = 0) {
  const unsigned blocks = blocks_for(static_cast<std::size_t>(E), kNormRouterWarps);
  const std::size_t smem = static_cast<std::size_t>(M) * (n * sizeof(T) + E * sizeof(float));
  router_rows(M, [&](auto m) {
    auto* kern = k_add_rmsnorm_router<T, decltype(m)::value>;
    if (blocks > 8) {  // past the portable cluster size (8): opt in, once per kernel
      static const bool opted = [&] {
        FPF_CUDA(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
        return true;
      }();
      (void)opted;
    }
    launch_ex("add_rmsnorm_router", kern, blocks, blocks, 32 * kNormRouterWarps, smem, s, x, y, w, out, W, E, n, eps, logits, k,
              norm ? 1 : 0, ids, wts);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// L2 prefetch (decode, sm_90): what a decode layer reads besides its experts, its weights and its KV caches' earlier
// positions, brought into L2 while the layer before it runs, so that its kernels read them from L2 instead of HBM.
// Issue-only: each thread issues cp.async.bulk.prefetch.L2 for its pieces and the block ends; no thread waits for
// the bytes, so the kernel holds no SM while they move. Values never change: a prefetch only moves bytes into L2.
// ---------------------------------------------------------------------------------------------------------------
inline constexpr int kPrefetchMaxRanges = 24;
inline constexpr unsigned kPrefetchPiece = 16384;  // bytes per bulk prefetch
struct PrefetchList {
  const void* p[kPrefetchMaxRanges] = {};
  unsigned long long n[kPrefetchMaxRanges] = {};
  int count = 0;
  // A prefetch is a hint: ranges past kPrefetchMaxRanges are left out.
  void add(const void* ptr, std::size_t bytes) {
    if (ptr == nullptr || bytes == 0 || count == kPrefetchMaxRanges) return;
    p[count] = ptr, n[count++] = bytes;
  }
};
// kv (optional): per row r, positions [0, row_pos[r]) of its sequence's K and V caches (kc/vc[row_seq[r]], rows of
// kv_dim T). Ranges start 16-byte aligned (cudaMalloc'd arrays); a range's last bytes past a multiple of 16 are left.
template <class T>
__global__ void k_prefetch_l2(PrefetchList w, T* const* __restrict__ kc, T* const* __restrict__ vc,
                              const std::int32_t* __restrict__ row_seq, const std::int32_t* __restrict__ row_pos, int rows,
                              int kv_dim) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned long long tid = blockIdx.x * blockDim.x + threadIdx.x, nt = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  auto issue = [&](const void* ptr, unsigned long long n) {
    const char* c = static_cast<const char*>(ptr);
    for (unsigned long long off = tid * kPrefetchPiece; off < n; off += nt * kPrefetchPiece) {
      const unsigned sz = static_cast<unsigned>(n - off < kPrefetchPiece ? n - off : kPrefetchPiece) & ~15u;
      if (sz != 0) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(c + off), "r"(sz) : "memory");
    }
  };
  for (int i = 0; i < w.count; ++i) issue(w.p[i], w.n[i]);
  if (kc != nullptr)
    for (int r = 0; r < rows; ++r) {
      const unsigned long long bytes = static_cast<unsigned long long>(row_pos[r]) * kv_dim * sizeof(T);
      issue(kc[row_seq[r]], bytes);
      issue(vc[row_seq[r]], bytes);
    }
#endif
}
// Whether the device has the bulk prefetch (sm_90); prefetch_l2 launches nothing elsewhere.
inline bool prefetch_l2_available() { return device_info().major == 9; }
template <class T>
void prefetch_l2(const PrefetchList& w, T* const* kc, T* const* vc, const std::int32_t* row_seq, const std::int32_t* row_pos,
                 int rows, int kv_dim, cudaStream_t s) {
  if (!prefetch_l2_available()) return;
  k_prefetch_l2<T><<<32, 64, 0, s>>>(w, kc, vc, row_seq, row_pos, rows, kv_dim);
  check(cudaGetLastError(), "prefetch_l2");
}

// ---------------------------------------------------------------------------------------------------------------
// log_softmax over the full vocabulary + top-k + argmax. lp = (x - max) - log(sum exp(x - max)), the sum in
// double (the CPU reference sums exp(x - max) directly; here per slice exp(x - m_s), rescaled by exp(m_s - max):
// equal up to double rounding); top-k by lp descending, ties to the lower id; argmax over the logits, first maximum.
// ---------------------------------------------------------------------------------------------------------------
// Two kernels, so that one row keeps many blocks busy (decode has one row per sequence) and no pass repeats a scan:
//   1. per slice of kLsmSliceLen logits (one block, the slice in registers): the slice's max m_s and first argmax,
//      sum_i exp(x_i - m_s) in double (per thread in ascending i, then block_sum's fixed tree), and the slice's top
//      K = k + kLsmExtra logits (value descending, ties to the lower id): each warp takes its top K by K rounds of a
//      warp arg-max, warp 0 merges the warps' sorted lists;
//   2. per row (one warp): m = the max of the m_s, sum = sum_s exp(m_s - m) * sum_s (double; each lane its slices in
//      ascending order, then a butterfly), logsum = log(sum); the row's top K logits merged from the slices' sorted
//      lists; lp = (x - m) - logsum of those, top-k by lp descending, ties to the lower id (the CPU reference ranks
//      lp, not x; lp is x shifted, so the K candidates hold the top-k unless more than kLsmExtra ids round to one lp).
// Arg-maxes compare 64-bit keys: the float's bits made unsigned-orderable, then ~id, so the larger key is the larger
// value and, among equal values, the lower id. Key 0 stands below every value (an exhausted list).
inline constexpr int kLsmThreads = 256, kLsmPer = 8, kLsmSliceLen = kLsmThreads * kLsmPer, kLsmExtra = 4;

__device__ __forceinline__ unsigned long long lsm_key(float v, int id) {
  const unsigned b = __float_as_uint(v);
  const unsigned o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<unsigned long long>(o) << 32) | (0xFFFFFFFFu - static_cast<unsigned>(id));
}
__device__ __forceinline__ float lsm_value(unsigned long long key) {
  const unsigned o = static_cast<unsigned>(key >> 32);
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o);
}
__device__ __forceinline__ int lsm_id(unsigned long long key) { return static_cast<int>(0xFFFFFFFFu - static_cast<unsigned>(key)); }
// The warp's largest key: two 32-bit warp reductions (the high words, then the low words of the keys that hold the
// largest high word) instead of a five-step butterfly of 64-bit shuffles. Exact: the same key either way.
__device__ __forceinline__ unsigned long long warp_max_key(unsigned long long k) {
  const unsigned hi = __reduce_max_sync(0xffffffffu, static_cast<unsigned>(k >> 32));
  const unsigned lo = __reduce_max_sync(0xffffffffu, static_cast<unsigned>(k >> 32) == hi ? static_cast<unsigned>(k) : 0u);
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

template <class T>
__global__ void __launch_bounds__(kLsmThreads) k_lsm_slice(const T* __restrict__ logits, long long V, int K,
                                                          unsigned long long* __restrict__ pkey, float* __restrict__ pmax,
                                                          double* __restrict__ psum, unsigned long long* __restrict__ cand) {
  pdl_begin();
  __shared__ double sd[32];
  __shared__ unsigned long long sk[32];
  extern __shared__ unsigned long long lists[];  // [warps][K]
  const int S = gridDim.y, slot = blockIdx.x * S + blockIdx.y;
  const long long b = static_cast<long long>(blockIdx.y) * kLsmSliceLen;
  const T* x = logits + static_cast<std::size_t>(blockIdx.x) * V;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float v[kLsmPer];
  unsigned long long key[kLsmPer];
  unsigned long long best = 0;
#pragma unroll
  for (int u = 0; u < kLsmPer; ++u) {
    const long long i = b + threadIdx.x + static_cast<long long>(u) * kLsmThreads;
    v[u] = i < V ? to_f(x[i]) : -INFINITY;
    key[u] = i < V ? lsm_key(v[u], static_cast<int>(i)) : 0ull;
    best = key[u] > best ? key[u] : best;
  }
  // the slice's max (and its first index)
  unsigned long long mk = warp_max_key(best);
  __syncthreads();
  if (lane == 0) sk[warp] = mk;
  __syncthreads();
  mk = warp_max_key(lane < nw ? sk[lane] : 0ull);
  const float m = lsm_value(mk);
  double sum = 0.0;
#pragma unroll
  for (int u = 0; u < kLsmPer; ++u)
    if (key[u] != 0) sum += exp(static_cast<double>(v[u] - m));
  sum = block_sum(sum, sd);
  if (threadIdx.x == 0) pkey[slot] = mk, pmax[slot] = m, psum[slot] = sum;
  // each warp's top K, then warp 0 merges the sorted lists
  for (int r = 0; r < K; ++r) {
    const unsigned long long w = warp_max_key(best);
    if (lane == 0) lists[warp * K + r] = w;
    if (w != 0 && best == w) {  // the owner lane drops it and finds its next best
      best = 0;
#pragma unroll
      for (int u = 0; u < kLsmPer; ++u) {
        if (key[u] == w) key[u] = 0;
        best = key[u] > best ? key[u] : best;
      }
    }
  }
  __syncthreads();
  if (warp != 0) return;
  int ptr = 0;  // lane l < nw: the head of warp l's list
  unsigned long long head = lane < nw ? lists[lane * K] : 0ull;
  for (int r = 0; r < K; ++r) {
    const unsigned long long w = warp_max_key(head);
    if (lane == 0) cand[static_cast<std::size_t>(slot) * K + r] = w;
    if (w != 0 && head == w) head = ++ptr < K ? lists[lane * K + ptr] : 0ull;
  }
}

// One warp per row; smem: K candidates, S list pointers, and (Staged) the S lists of K candidates: the merge's
// rounds then read shared memory instead of waiting on global loads (with the slices: 21.7 -> 21.2 us, H100).
template <bool Staged>
__global__ void k_lsm_final(const unsigned long long* __restrict__ pkey, const float* __restrict__ pmax,
                            const double* __restrict__ psum, const unsigned long long* __restrict__ cand, int S, int K, int k,
                            std::int32_t* __restrict__ top_ids, float* __restrict__ top_lp, std::int32_t* __restrict__ argmax) {
  pdl_begin();
  // [K] the row's top K by value, [K] their keys by lp, (Staged) [S K] the lists, then (as int) the slices' pointers
  extern __shared__ unsigned long long top[];
  unsigned long long* const lpk = top + K;
  unsigned long long* const lists = lpk + K;
  int* ptr = reinterpret_cast<int*>(lists + (Staged ? S * K : 0));
  const int r = blockIdx.x, lane = threadIdx.x;
  const unsigned long long* pk = pkey + static_cast<std::size_t>(r) * S;
  const float* pm = pmax + static_cast<std::size_t>(r) * S;
  const double* ps = psum + static_cast<std::size_t>(r) * S;
  const unsigned long long* cd = cand + static_cast<std::size_t>(r) * S * K;
  if constexpr (Staged) {
    for (int i = lane; i < S * K; i += 32) lists[i] = cd[i];
    cd = lists;
    __syncwarp();
  }
  unsigned long long mk = 0;
  for (int s = lane; s < S; s += 32) mk = pk[s] > mk ? pk[s] : mk;
  mk = warp_max_key(mk);
  const float m = lsm_value(mk);
  double sum = 0.0;
  for (int s = lane; s < S; s += 32) sum += exp(static_cast<double>(pm[s] - m)) * ps[s];
  sum = warp_sum(sum);
  const float logsum = static_cast<float>(log(sum));
  if (lane == 0) argmax[r] = lsm_id(mk);
  // merge: lane l owns the lists l, l + 32, ...; its best head
  unsigned long long head = 0;
  for (int s = lane; s < S; s += 32) {
    ptr[s] = 0;
    head = cd[static_cast<std::size_t>(s) * K] > head ? cd[static_cast<std::size_t>(s) * K] : head;
  }
  for (int t = 0; t < K; ++t) {
    const unsigned long long w = warp_max_key(head);
    if (lane == 0) top[t] = w;
    if (w != 0 && head == w) {
      head = 0;
      for (int s = lane; s < S; s += 32) {
        const unsigned long long* l = cd + static_cast<std::size_t>(s) * K;
        if (ptr[s] < K && l[ptr[s]] == w) ++ptr[s];
        const unsigned long long h = ptr[s] < K ? l[ptr[s]] : 0ull;
        head = h > head ? h : head;
      }
    }
  }
  __syncwarp();
  // top-k of the candidates by lp = (x - m) - logsum, ties to the lower id: each candidate's key by lp, then its rank
  // among the candidates' keys (distinct: the ids differ) is its place; places past the candidates get id 0x7fffffff
  // and -inf. (The same picks and order as k rounds of an arg-max, without the rounds' warp reductions.)
  for (int c = lane; c < K; c += 32) {
    const unsigned long long x = top[c];
    lpk[c] = x != 0 ? lsm_key((lsm_value(x) - m) - logsum, lsm_id(x)) : 0ull;
  }
  __syncwarp();
  int found = 0;
  for (int c = 0; c < K; ++c) found += lpk[c] != 0 ? 1 : 0;
  for (int c = lane; c < K; c += 32) {
    const unsigned long long key = lpk[c];
    if (key == 0) continue;
    int rank = 0;
    for (int j = 0; j < K; ++j) rank += lpk[j] > key ? 1 : 0;
    if (rank < k) top_ids[r * k + rank] = lsm_id(key), top_lp[r * k + rank] = lsm_value(key);
  }
  for (int s = found + lane; s < k; s += 32) top_ids[r * k + s] = 0x7fffffff, top_lp[r * k + s] = -INFINITY;
}

// The per-slice scratch of log_softmax_topk (keys, maxima, sums, candidates). Its owner (a backend) keeps it, so
// that backends on different streams never share one; reserve it before capturing a graph that uses it.
struct LsmScratch {
  DeviceBuffer<unsigned long long> pkey, cand;
  DeviceBuffer<float> pmax;
  DeviceBuffer<double> psum;
  // Sizes it for rows x V and top-k; returns whether a buffer moved (graphs that point into it are stale).
  bool reserve(int rows, long long V, int k) {
    const std::size_t n = static_cast<std::size_t>(rows) * static_cast<std::size_t>((V + kLsmSliceLen - 1) / kLsmSliceLen);
    bool moved = pkey.resize(n);
    moved |= pmax.resize(n);
    moved |= psum.resize(n);
    moved |= cand.resize(n * static_cast<std::size_t>(k + kLsmExtra));
    return moved;
  }
};

template <class T>
void log_softmax_topk(const T* logits, int rows, long long V, int k, std::int32_t* top_ids, float* top_lp,
                      std::int32_t* argmax, LsmScratch& scratch, cudaStream_t s = 0) {
  if (rows == 0) return;
  if (k > 256) throw Error("--topk", "the CUDA backend supports at most 256");
  scratch.reserve(rows, V, k);  // nothing to do when the owner reserved it
  const int S = static_cast<int>((V + kLsmSliceLen - 1) / kLsmSliceLen);
  const int K = k + kLsmExtra;
  launch("lsm_slice", k_lsm_slice<T>, dim3(rows, S), kLsmThreads, (kLsmThreads / 32) * K * sizeof(unsigned long long), s, logits,
         V, K, scratch.pkey.get(), scratch.pmax.get(), scratch.psum.get(), scratch.cand.get());
  const std::size_t staged = (static_cast<std::size_t>(K) * (2 + S)) * sizeof(unsigned long long) + S * sizeof(int);
  if (staged <= 48 * 1024)
    launch("lsm_final", k_lsm_final<true>, rows, 32, staged, s, scratch.pkey.get(), scratch.pmax.get(), scratch.psum.get(),
           scratch.cand.get(), S, K, k, top_ids, top_lp, argmax);
  else
    launch("lsm_final", k_lsm_final<false>, rows, 32, 2 * K * sizeof(unsigned long long) + S * sizeof(int), s, scratch.pkey.get(),
           scratch.pmax.get(), scratch.psum.get(), scratch.cand.get(), S, K, k, top_ids, top_lp, argmax);
}

}  // namespace fpf::cuda::ops
