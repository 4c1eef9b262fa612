#pragma once
// 4-bit Linears on the GPU: the quant::Packed4 form (quant/packed.hpp) of AWQ, GPTQ and NF4 on the device, a fused
// dequant GEMV for decode (<= 8 rows, and the MoE per-slot products), and a dequantize kernel that writes the
// weights as T for the prefill path's cuBLASLt product.
//
// Order of operations (every scheme, every storage type T):
//   1. the weight in fp32 by the format's formula: Affine (q - z) * s, one rounding; Nf4 code[q] * absmax, rounded
//      to the quant state's dtype (bitsandbytes' own output dtype);
//   2. rounded once to T (exact when T is fp32, or when the NF4 state dtype is T): the value a dequantize-then-
//      multiply implementation in T would hold, and what the prefill path writes for cuBLASLt;
//   3. products with T activations widened to fp32, summed in fp32 in a fixed order (each lane in ascending k of
//      its chunks, then a butterfly over the 32 lanes), the output rounded once to T.
// So a decode GEMV and a prefill GEMM on the same weights see the same weight values; they differ only in summation
// order, like the dense path. No atomics; repetitions are bit-identical.
//
// Kernel shapes: one warp per output row (as ops::gemv). The wide path (K and G multiples of 32, no permutation,
// 16-byte aligned activations) loads 32 codes per lane as one 16-byte vector, all in one group; the narrow path
// loads 8 codes (one group) per lane and gathers permuted activations (GPTQ act-order).
#include <cstdint>
#include <vector>

#include <fpf/backend/cuda/common.cuh>
#include <fpf/backend/cuda/ops.cuh>
#include <fpf/quant/packed.hpp>

namespace fpf::cuda::q {

// Rounding of NF4 values to the quant state's dtype.
enum Round : int { kRoundNone = 0, kRoundBf16 = 1, kRoundF16 = 2 };

// E matrices [N, K] of one packing on the device (kernel arguments by value).
struct Args {
  const std::uint32_t* words;  // [E, N, K/8]
  const float* scales;         // [E, spm]
  const std::uint8_t* zeros;   // Affine: [E, N, ng]
  const std::int32_t* perm;    // null, or [E, K]
  int N, K, G, ng;
  long long spm;  // scales per matrix
  float code[16];  // NF4 code values
};

template <int Round>
__device__ __forceinline__ float round_state(float v) {
  if constexpr (Round == kRoundBf16) return __bfloat162float(__float2bfloat16_rn(v));
  else if constexpr (Round == kRoundF16) return __half2float(__float2half_rn(v));
  else return v;
}

// Code: 0 Affine, 1 Nf4. The weight value as the storage type T holds it, widened to fp32.
template <class T, int Code, int Round>
__device__ __forceinline__ float weight(const Args& a, unsigned q, float s, int z) {
  float v;
  if constexpr (Code == 0) v = __fmul_rn(static_cast<float>(static_cast<int>(q) - z), s);  // exact int times s: one rounding
  else v = round_state<Round>(__fmul_rn(a.code[q], s));
  return to_f(from_f<T>(v));
}

// Per output row n of matrix e: scale index and zero of the group holding stored position kk.
template <int Code>
__device__ __forceinline__ void group_of(const Args& a, int e, int n, int kk, float& s, int& z) {
  if constexpr (Code == 0) {
    const long long gi = static_cast<long long>(n) * a.ng + kk / a.G;
    s = a.scales[e * a.spm + gi];
    z = a.zeros[static_cast<long long>(e) * a.N * a.ng + gi];
  } else {
    s = a.scales[e * a.spm + (static_cast<long long>(n) * a.K + kk) / a.G];
    z = 0;
  }
}

// Y[m, n] (row stride ldy) = sum_k X[m, k] W_e[n, k]. Dense mode (ids null): M rows of X (stride x_stride), e = 0.
// MoE mode: blockIdx.y is slot p, e = ids[p], one row X[p / x_div], output row Y[p].
template <class T, int Code, int Round, int MaxM, bool Wide>
__global__ void k_qgemv(Args a, const T* __restrict__ X, int M, long long x_stride, int x_div,
                        const std::int32_t* __restrict__ ids, T* __restrict__ Y, long long ldy) {
  const int n = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (n >= a.N) return;
  const int lane = threadIdx.x & 31;
  int e = 0;
  const T* x = X;
  T* y = Y;
  if (ids != nullptr) {
    const int p = blockIdx.y;
    e = ids[p];
    x = X + static_cast<long long>(p / x_div) * x_stride;
    y = Y + static_cast<long long>(p) * ldy;
  }
  const int W = a.K / 8;
  const std::uint32_t* wr = a.words + (static_cast<long long>(e) * a.N + n) * W;
  const std::int32_t* perm = a.perm != nullptr ? a.perm + static_cast<long long>(e) * a.K : nullptr;
  float acc[MaxM];
#pragma unroll
  for (int m = 0; m < MaxM; ++m) acc[m] = 0.0f;
  if constexpr (Wide) {
    constexpr int V = ops::Vec<T>::n;  // activations per 16-byte load
    for (int c = lane; c < W / 4; c += 32) {
      const uint4 wv = reinterpret_cast<const uint4*>(wr)[c];
      const std::uint32_t ws[4] = {wv.x, wv.y, wv.z, wv.w};
      float s;
      int z;
      group_of<Code>(a, e, n, 32 * c, s, z);
      float w[32];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int i = 0; i < 8; ++i) w[8 * j + i] = weight<T, Code, Round>(a, (ws[j] >> (4 * i)) & 0xFu, s, z);
#pragma unroll
      for (int m = 0; m < MaxM; ++m) {
        if (m >= M) break;
        const ops::Vec<T>* xv = reinterpret_cast<const ops::Vec<T>*>(x + m * x_stride + 32 * c);
#pragma unroll
        for (int v = 0; v < 32 / V; ++v) {
          const ops::Vec<T> xx = xv[v];
#pragma unroll
          for (int i = 0; i < V; ++i) acc[m] += w[v * V + i] * to_f(xx.v[i]);
        }
      }
    }
  } else {
    for (int c = lane; c < W; c += 32) {
      const std::uint32_t ws = wr[c];
      float s;
      int z;
      group_of<Code>(a, e, n, 8 * c, s, z);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float w = weight<T, Code, Round>(a, (ws >> (4 * i)) & 0xFu, s, z);
        const int k = perm != nullptr ? perm[8 * c + i] : 8 * c + i;
#pragma unroll
        for (int m = 0; m < MaxM; ++m)
          if (m < M) acc[m] += w * to_f(x[m * x_stride + k]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MaxM; ++m) acc[m] = warp_sum(acc[m]);
  if (lane == 0)
#pragma unroll
    for (int m = 0; m < MaxM; ++m)
      if (m < M) y[m * ldy + n] = from_f<T>(acc[m]);
}

// W_e as T [N, K] row-major in the module's own input order (row stride ldw), for cuBLASLt.
template <class T, int Code, int Round>
__global__ void k_qdequant(Args a, int e, T* __restrict__ out, long long ldw) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;  // word index in the matrix
  const int W = a.K / 8;
  if (i >= static_cast<long long>(a.N) * W) return;
  const int n = static_cast<int>(i / W), c = static_cast<int>(i % W);
  const std::uint32_t ws = a.words[static_cast<long long>(e) * a.N * W + i];
  float s;
  int z;
  group_of<Code>(a, e, n, 8 * c, s, z);
  const std::int32_t* perm = a.perm != nullptr ? a.perm + static_cast<long long>(e) * a.K : nullptr;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int k = perm != nullptr ? perm[8 * c + j] : 8 * c + j;
    out[n * ldw + k] = from_f<T>(weight<T, Code, Round>(a, (ws >> (4 * j)) & 0xFu, s, z));
  }
}

// E packed matrices of one shape on the device.
class Weight {
 public:
  // All parts must share N, K, code, G, dtype (a checkpoint's experts do); perms may differ per matrix.
  void upload(const std::vector<quant::Packed4>& mats) {
    if (mats.empty()) throw Error("q::Weight", "no matrices");
    const quant::Packed4& a = mats.front();
    E_ = static_cast<int>(mats.size());
    N_ = static_cast<int>(a.N), K_ = static_cast<int>(a.K), G_ = static_cast<int>(a.G), ng_ = static_cast<int>(a.groups_per_row());
    code_ = static_cast<int>(a.code);
    round_ = a.code == quant::Packed4::Code::Nf4 ? (a.nf4_dtype == DType::BF16 ? kRoundBf16 : a.nf4_dtype == DType::F16 ? kRoundF16 : kRoundNone)
                                                 : kRoundNone;
    spm_ = a.scale_count();
    const bool has_perm = !a.perm.empty();
    for (const quant::Packed4& p : mats)
      if (p.N != a.N || p.K != a.K || p.G != a.G || p.code != a.code || p.nf4_dtype != a.nf4_dtype || p.perm.empty() != !has_perm)
        throw Error("q::Weight", "matrices of one weight must share their packing");
    const std::size_t wn = a.words.size(), sn = a.scales.size(), zn = a.zeros.size(), pn = a.perm.size();
    words_.resize(wn * mats.size());
    scales_.resize(sn * mats.size());
    if (zn) zeros_.resize(zn * mats.size());
    if (pn) perm_.resize(pn * mats.size());
    for (std::size_t i = 0; i < mats.size(); ++i) {
      words_.upload(mats[i].words.data(), wn, i * wn);
      scales_.upload(mats[i].scales.data(), sn, i * sn);
      if (zn) zeros_.upload(mats[i].zeros.data(), zn, i * zn);
      if (pn) perm_.upload(mats[i].perm.data(), pn, i * pn);
    }
    bytes_ = (words_.size() * 4 + scales_.size() * 4 + zeros_.size() + perm_.size() * 4) / static_cast<std::size_t>(E_);
  }

  int N() const { return N_; }
  int K() const { return K_; }
  std::size_t bytes_per_matrix() const { return bytes_; }

  // Y[m, 0..N) (row stride ldy) = X[m] W^T for M <= ops::kGemvMaxRows rows (stride x_stride).
  template <class T>
  void gemv(const T* X, int M, long long x_stride, T* Y, long long ldy, cudaStream_t s = 0) const {
    launch<T>(X, M, x_stride, 1, nullptr, 1, Y, ldy, s);
  }
  // MoE decode: for slot p < slots, Y[p] = W_{ids[p]} X[p / x_div].
  template <class T>
  void moe_gemv(const T* X, long long x_stride, int x_div, const std::int32_t* ids, int slots, T* Y, long long ldy,
                cudaStream_t s = 0) const {
    if (slots > 0) launch<T>(X, 1, x_stride, x_div, ids, slots, Y, ldy, s);
  }
  // Matrix e as T [N, K] (row stride ldw) at out.
  template <class T>
  void dequantize(int e, T* out, long long ldw, cudaStream_t s = 0) const {
    const Args a = args();
    const unsigned blocks = blocks_for(static_cast<std::size_t>(N_) * (K_ / 8), 256);
    switch (code_ * 3 + round_) {
      case 0: k_qdequant<T, 0, kRoundNone><<<blocks, 256, 0, s>>>(a, e, out, ldw); break;
      case 3: k_qdequant<T, 1, kRoundNone><<<blocks, 256, 0, s>>>(a, e, out, ldw); break;
      case 4: k_qdequant<T, 1, kRoundBf16><<<blocks, 256, 0, s>>>(a, e, out, ldw); break;
      case 5: k_qdequant<T, 1, kRoundF16><<<blocks, 256, 0, s>>>(a, e, out, ldw); break;
      default: throw Error("q::Weight", "bad code");
    }
    FPF_CUDA_LAUNCH("qdequant");
  }

 private:
  Args args() const {
    Args a{};
    a.words = words_.get();
    a.scales = scales_.get();
    a.zeros = zeros_.get();
    a.perm = perm_.get();
    a.N = N_, a.K = K_, a.G = G_, a.ng = ng_;
    a.spm = spm_;
    for (int i = 0; i < 16; ++i) a.code[i] = quant::kNf4Code[i];
    return a;
  }

  template <class T>
  void launch(const T* X, int M, long long x_stride, int x_div, const std::int32_t* ids, int slots, T* Y, long long ldy,
              cudaStream_t s) const {
    if (M == 0) return;
    if (M > ops::kGemvMaxRows) throw Error("q::Weight::gemv", "at most " + std::to_string(ops::kGemvMaxRows) + " rows");
    const bool wide = K_ % 32 == 0 && G_ % 32 == 0 && perm_.get() == nullptr &&
                      reinterpret_cast<std::uintptr_t>(X) % 16 == 0 && (x_stride * sizeof(T)) % 16 == 0;
    const int mm = M == 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
    const int key = ((code_ * 3 + round_) * 4 + (mm == 1 ? 0 : mm == 2 ? 1 : mm == 4 ? 2 : 3)) * 2 + (wide ? 1 : 0);
    dispatch<T>(key, X, M, x_stride, x_div, ids, slots, Y, ldy, s);
  }

  template <class T, int Code, int Round, int MaxM, bool Wide>
  void run(const T* X, int M, long long x_stride, int x_div, const std::int32_t* ids, int slots, T* Y, long long ldy,
           cudaStream_t s) const {
    const dim3 grid(blocks_for(static_cast<std::size_t>(N_), 8), static_cast<unsigned>(slots));
    k_qgemv<T, Code, Round, MaxM, Wide><<<grid, 256, 0, s>>>(args(), X, M, x_stride, x_div, ids, Y, ldy);
    FPF_CUDA_LAUNCH("qgemv");
  }

  template <class T, int Code, int Round>
  void by_rows(int mkey, bool wide, const T* X, int M, long long xs, int xd, const std::int32_t* ids, int slots, T* Y,
               long long ldy, cudaStream_t s) const {
#define FPF_Q_ROWS(MM)                                                                  \
  if (wide) run<T, Code, Round, MM, true>(X, M, xs, xd, ids, slots, Y, ldy, s);         \
  else run<T, Code, Round, MM, false>(X, M, xs, xd, ids, slots, Y, ldy, s);             \
  return;
    switch (mkey) {
      case 0: FPF_Q_ROWS(1)
      case 1: FPF_Q_ROWS(2)
      case 2: FPF_Q_ROWS(4)
      default: FPF_Q_ROWS(8)
    }
#undef FPF_Q_ROWS
  }

  template <class T>
  void dispatch(int key, const T* X, int M, long long xs, int xd, const std::int32_t* ids, int slots, T* Y, long long ldy,
                cudaStream_t s) const {
    const bool wide = key % 2 == 1;
    const int mkey = (key / 2) % 4;
    switch (key / 8) {
      case 0: return by_rows<T, 0, kRoundNone>(mkey, wide, X, M, xs, xd, ids, slots, Y, ldy, s);
      case 3: return by_rows<T, 1, kRoundNone>(mkey, wide, X, M, xs, xd, ids, slots, Y, ldy, s);
      case 4: return by_rows<T, 1, kRoundBf16>(mkey, wide, X, M, xs, xd, ids, slots, Y, ldy, s);
      case 5: return by_rows<T, 1, kRoundF16>(mkey, wide, X, M, xs, xd, ids, slots, Y, ldy, s);
      default: throw Error("q::Weight", "bad code");
    }
  }

  int E_ = 0, N_ = 0, K_ = 0, G_ = 0, ng_ = 0, code_ = 0, round_ = 0;
  long long spm_ = 0;
  std::size_t bytes_ = 0;
  DeviceBuffer<std::uint32_t> words_;
  DeviceBuffer<float> scales_;
  DeviceBuffer<std::uint8_t> zeros_;
  DeviceBuffer<std::int32_t> perm_;
};

}  // namespace fpf::cuda::q
