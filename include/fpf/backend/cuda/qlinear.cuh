#pragma once
// 4-bit Linears on the GPU: the quant::Packed4 form (quant/packed.hpp) of AWQ, GPTQ and NF4 on the device, a fused
// dequant GEMV for decode (<= 8 rows, and the MoE per-slot products), and a dequantize kernel that writes the
// weights as T for the prefill path's cuBLASLt product.
//
// Order of operations (every scheme, every storage type T):
//   1. the weight in fp32 by the format's formula: Affine (q - z) * s, one rounding; Nf4 code[q] * absmax, rounded
//      to the quant state's dtype (bitsandbytes' own output dtype);
//   2. decode GEMV, fp32 throughout: Affine factors each 8-code word's scale out of its products,
//      t = sum_i (q_i - z) x_i (q - z exact), acc += s t; Nf4 multiplies each weight of step 1 by its activation;
//      each lane sums its words in ascending k, then a butterfly over the 32 lanes; the output is rounded once to T.
//      Except Affine codes with bf16/fp16 activations where K and G are multiples of 128 (the real AWQ/GPTQ
//      checkpoints): k_qmma, q - z exact in T, the tensor core's sum of 16 exact products at a time, t per
//      128-code chunk, acc += s t in fp32 (details at k_qmma);
//   3. prefill: the fp32 weight rounded once to T (exact when T is fp32, or when the NF4 state dtype is T) and
//      written as a T matrix for cuBLASLt (tensor cores need T operands), fp32 accumulation there.
// So in bf16/fp16 the decode products use the exact dequantized weights and the prefill products their rounding
// to T; in fp32 both use the same values. No atomics; repetitions are bit-identical.
//
// Kernel shape: k_qgemv32 where K and G are multiples of 32 and the activations are aligned and not permuted (the
// real checkpoints): 16-byte loads of 32 codes, 8 or 32 lanes per row, a lane's loads issued before its products
// (affine products 26.7 us per layer on the H100, was 35.2); its modes also fuse the MoE decode's SwiGLU into gate_up
// and the combine into down (same bits as the separate ops). Else k_qgemv: one warp per output row, 8 codes per
// lane and load; activations 8 per 16-byte load when aligned and not permuted, else one by one (GPTQ act-order).
// k_qmma (tensor cores) takes the Affine bf16/fp16 shapes whose K and G are multiples of 128. All are launched with
// programmatic dependent launch (cuda::launch).
#include <cstdint>
#include <type_traits>
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
  int gshift;     // log2(G / 8) when G / 8 is a power of two (group of an 8-code word by a shift), else -1
  long long spm;  // scales per matrix
  float code[16];  // NF4 code values
};

// Round to nearest even into bf16 and back, on the bits (finite values; full-rate integer ops instead of a
// conversion instruction); fp16 through the conversion.
template <int Round>
__device__ __forceinline__ float round_state(float v) {
  if constexpr (Round == kRoundBf16) {
    unsigned u = __float_as_uint(v);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return __uint_as_float(u & 0xFFFF0000u);
  } else if constexpr (Round == kRoundF16) {
    return __half2float(__float2half_rn(v));
  } else {
    return v;
  }
}

// The weight in fp32 by the format's formula (Code 0 Affine, 1 Nf4), the CPU reference's value. Affine: the float
// with bits 0x4B000000 | q is 2^23 + q, and zb = 2^23 + z, so their difference is q - z exactly (no int-to-float
// conversion); one rounding in the product with the scale. code: the NF4 table in shared memory.
template <int Code, int Round>
__device__ __forceinline__ float weight(const float* code, unsigned q, float s, float zb) {
  if constexpr (Code == 0) return __fmul_rn(__fsub_rn(__uint_as_float(0x4B000000u | q), zb), s);
  else return round_state<Round>(__fmul_rn(code[q], s));
}

// Per output row n of matrix e: the scale and 2^23 + zero of the group holding stored position kk.
template <int Code>
__device__ __forceinline__ void group_of(const Args& a, int e, int n, int kk, float& s, float& zb) {
  if constexpr (Code == 0) {
    const long long gi = static_cast<long long>(n) * a.ng + kk / a.G;
    s = a.scales[e * a.spm + gi];
    zb = 8388608.0f + static_cast<float>(a.zeros[static_cast<long long>(e) * a.N * a.ng + gi]);
  } else {
    s = a.scales[e * a.spm + (static_cast<long long>(n) * a.K + kk) / a.G];
    zb = 0.0f;
  }
}

// Eight consecutive activations (16-byte aligned) widened to fp32: one 16-byte load for bf16/fp16, two for fp32.
template <class T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<T, bf16>) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
      } else {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
      }
    }
  }
}

// The matrix, activation row and output row of a block. Dense mode (ids null): matrix 0, X and Y as given. MoE mode:
// slot p = blockIdx.y takes matrix ids[p], activation row p / x_div and output row p (read ids after pdl_wait).
template <class T>
struct Slot {
  int e;
  const T* x;
  T* y;
};
template <class T>
__device__ __forceinline__ Slot<T> slot_of(const T* X, long long x_stride, int x_div, const std::int32_t* ids, T* Y, long long ldy) {
  if (ids == nullptr) return {0, X, Y};
  const int p = blockIdx.y;
  return {ids[p], X + static_cast<long long>(p / x_div) * x_stride, Y + static_cast<long long>(p) * ldy};
}

// Y[m, n] (row stride ldy) = sum_k X[m, k] W_e[n, k]. Dense mode (ids null): M rows of X (stride x_stride), e = 0.
// MoE mode: blockIdx.y is slot p, e = ids[p], one row X[p / x_div], output row Y[p].
// One warp per output row; lane l takes the row's 8-code words l, l + 32, l + 64, ... (so each warp-wide load of
// codes, and of the matching 8 activations per lane, is contiguous), four words in flight at a time, and sums its
// products in ascending k; then a butterfly over the lanes. Vec: activations 16-byte aligned and not permuted
// (8 per load); otherwise each activation is read on its own (act-order gathers x[perm[k]]).
template <class T, int Code, int Round, int MaxM, bool Vec>
__global__ void k_qgemv(Args a, const T* __restrict__ X, int M, long long x_stride, int x_div,
                        const std::int32_t* __restrict__ ids, T* __restrict__ Y, long long ldy) {
  pdl_begin();
  __shared__ float code[16];
  if constexpr (Code == 1) {
    if (threadIdx.x < 16) code[threadIdx.x] = a.code[threadIdx.x];
    __syncthreads();
  }
  const int n = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (n >= a.N) return;
  const int lane = threadIdx.x & 31;
  const auto [e, x, y] = slot_of(X, x_stride, x_div, ids, Y, ldy);
  const int W = a.K / 8;
  const std::uint32_t* wr = a.words + (static_cast<long long>(e) * a.N + n) * W;
  const std::int32_t* perm = a.perm != nullptr ? a.perm + static_cast<long long>(e) * a.K : nullptr;
  // Group of word c: Affine row-local (scales/zeros of this row), Nf4 over the flattened weight (word n * W + c).
  const int wpg = a.G / 8;  // words per group
  const float* srow = a.scales + e * a.spm + (Code == 0 ? static_cast<long long>(n) * a.ng : 0);
  const std::uint8_t* zrow = Code == 0 ? a.zeros + (static_cast<long long>(e) * a.N + n) * a.ng : nullptr;
  const long long fbase = Code == 0 ? 0 : static_cast<long long>(n) * W;
  float acc[MaxM];
#pragma unroll
  for (int m = 0; m < MaxM; ++m) acc[m] = 0.0f;
  constexpr int U = 4;  // words in flight per lane
  for (int c0 = lane; c0 < W; c0 += 32 * U) {
    std::uint32_t ws[U];
#pragma unroll
    for (int u = 0; u < U; ++u) ws[u] = c0 + 32 * u < W ? wr[c0 + 32 * u] : 0u;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c >= W) break;
      const long long fw = fbase + c;
      const long long g = a.gshift >= 0 ? fw >> a.gshift : fw / wpg;
      const float s = srow[g];
      float w[8];  // Affine: q - z (exact); Nf4: the weight
      if constexpr (Code == 0) {
        // Codes 2j and 2j + 1 sit in byte j of lo and hi; __byte_perm builds the float 2^23 + q from one byte.
        const float zb = 8388608.0f + static_cast<float>(zrow[g]);
        const unsigned lo = ws[u] & 0x0F0F0F0Fu, hi = (ws[u] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          w[2 * j] = __fsub_rn(__uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7540u + j)), zb);
          w[2 * j + 1] = __fsub_rn(__uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7540u + j)), zb);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) w[i] = weight<Code, Round>(code, (ws[u] >> (4 * i)) & 0xFu, s, 0.0f);
      }
#pragma unroll
      for (int m = 0; m < MaxM; ++m) {
        if (m >= M) break;
        float xv[8];
        if constexpr (Vec) {
          load8<T>(x + m * x_stride + 8 * c, xv);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) xv[i] = to_f(x[m * x_stride + (perm != nullptr ? perm[8 * c + i] : 8 * c + i)]);
        }
        if constexpr (Code == 0) {
          float t = 0.0f;
#pragma unroll
          for (int i = 0; i < 8; ++i) t = fmaf(w[i], xv[i], t);
          acc[m] = fmaf(s, t, acc[m]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[m] = fmaf(w[i], xv[i], acc[m]);
        }
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

// The decode GEMV's fast path (no permutation, K and G multiples of 32, 16-byte aligned activation rows): a row's
// codes read as 32-code chunks (16 bytes: 4 words, all in one group). LPR lanes per row (32 / LPR rows per warp);
// lane l of a row takes the chunks l, l + LPR, l + 2 LPR, ..., CPL at a time, and issues a batch's loads (codes,
// scales, zeros) before any product. The sums are those of k_qgemv (per 8-code word t = sum_i (q_i - z) x_i, then
// acc += s t, Affine; code-table weights times activations, Nf4), each lane's words in ascending k, then a
// butterfly over the row's LPR lanes. Kernel arguments as k_qgemv; `rows` output rows per matrix. Modes:
//   kPlain   Y[m, n] = the row's sum rounded to T;
//   kSwiglu  (MoE gate_up) the row groups of a block alternate between gate row n and up row n + pair of one
//            expert; the gate's lanes write silu(T(gate)) * T(up), rounded to T, to Y[n]: ops::swiglu's value;
//   kCombine (MoE down, one activation row per slot, blockDim = 32 k) warp w takes slot w of token blockIdx.y, all
//            warps the same rows; then per row n, Y[token, n] (the residual) += T(sum_s T(out_s) wts[s]), the sum in
//            slot order: ops::moe_combine's value, without writing the slots' outputs.
enum Mode : int { kPlain = 0, kSwiglu = 1, kCombine = 2 };
inline constexpr int kCombineMaxSlots = 8;  // kCombine: slots per token (warps per block)
template <class T, int Code, int Round, int MaxM, int LPR, int CPL, int Mode>
__global__ void __launch_bounds__(Mode == kCombine ? 32 * kCombineMaxSlots : 128)
    k_qgemv32(Args a, const T* __restrict__ X, int M, long long x_stride, int x_div, const std::int32_t* __restrict__ ids,
              T* __restrict__ Y, long long ldy, int rows, int pair, const float* __restrict__ wts) {
  __shared__ float code[16];
  __shared__ float part[32][32 / LPR];  // kCombine: [slot][row of the block]; kSwiglu: the row groups' sums
  if constexpr (Code == 1) {
    if (threadIdx.x < 16) code[threadIdx.x] = a.code[threadIdx.x];
    __syncthreads();
  }
  constexpr int RPW = 32 / LPR;  // row groups per warp
  const int lane = threadIdx.x & 31, sub = lane & (LPR - 1), warp = threadIdx.x >> 5;
  const int g = (Mode == kCombine ? blockIdx.x : blockIdx.x * (blockDim.x >> 5) + warp) * RPW + lane / LPR;
  const int n = Mode == kSwiglu ? g >> 1 : g;  // output row
  const bool valid = n < rows;  // every lane stays for the shuffles
  const long long nn = (valid ? n : 0) + (Mode == kSwiglu && (g & 1) ? static_cast<long long>(pair) : 0);  // weight row
  // Dense mode: the weights are fixed, so the first batch's loads are issued before pdl_begin (while the kernel
  // that writes X may still be running). MoE mode: the matrix is ids[p], written by the router: wait first.
  if (ids != nullptr) pdl_wait();
  int e = 0;
  const T* x = X;
  T* y = Y;
  if constexpr (Mode == kCombine) {
    const int p = blockIdx.y * (blockDim.x >> 5) + warp;
    e = ids[p], x = X + static_cast<long long>(p) * x_stride, y = Y + static_cast<long long>(blockIdx.y) * ldy;
  } else {
    const Slot<T> sl = slot_of(X, x_stride, x_div, ids, Y, ldy);
    e = sl.e, x = sl.x, y = sl.y;
  }
  const int C = a.K >> 5;  // chunks per row
  const int cshift = a.gshift >= 2 ? a.gshift - 2 : -1;  // log2(G / 32)
  const uint4* wr = reinterpret_cast<const uint4*>(a.words + (static_cast<long long>(e) * a.N + nn) * (a.K / 8));
  const float* srow = a.scales + e * a.spm + (Code == 0 ? nn * a.ng : 0);
  const std::uint8_t* zrow = Code == 0 ? a.zeros + (static_cast<long long>(e) * a.N + nn) * a.ng : nullptr;
  const long long fbase = nn * a.K;  // Nf4: the row's first weight in the flattened matrix
  float acc[MaxM];
#pragma unroll
  for (int m = 0; m < MaxM; ++m) acc[m] = 0.0f;
  uint4 q[CPL];
  float s[CPL], zb[CPL];
  // The codes, scales and zeros of the chunks c0, c0 + LPR, ..., c0 + (CPL - 1) LPR.
  auto load = [&](int c0) {
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int c = c0 + LPR * j;
      q[j] = make_uint4(0u, 0u, 0u, 0u);
      s[j] = 0.0f;
      zb[j] = 8388608.0f;
      if (valid && c < C) {
        q[j] = __ldg(wr + c);
        if constexpr (Code == 0) {
          const int gi = cshift >= 0 ? c >> cshift : 32 * c / a.G;
          s[j] = __ldg(srow + gi);
          zb[j] = __uint_as_float(0x4B000000u | __ldg(zrow + gi));  // 2^23 + z, exactly
        } else {
          const long long f = fbase + 32 * c;
          s[j] = __ldg(srow + (a.gshift >= 0 ? f >> (a.gshift + 3) : f / a.G));
        }
      }
    }
  };
  load(sub);
  pdl_begin();
  for (int c0 = sub; c0 < C; c0 += LPR * CPL) {
    if (c0 != sub) load(c0);
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int c = c0 + LPR * j;
      if (!valid || c >= C) break;
      const unsigned ws[4] = {q[j].x, q[j].y, q[j].z, q[j].w};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float w[8];  // Affine: q - z (exact); Nf4: the weight
        if constexpr (Code == 0) {
          const unsigned lo = ws[u] & 0x0F0F0F0Fu, hi = (ws[u] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            w[2 * i] = __fsub_rn(__uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7540u + i)), zb[j]);
            w[2 * i + 1] = __fsub_rn(__uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7540u + i)), zb[j]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) w[i] = weight<Code, Round>(code, (ws[u] >> (4 * i)) & 0xFu, s[j], 0.0f);
        }
#pragma unroll
        for (int m = 0; m < MaxM; ++m) {
          if (m >= M) break;
          float xv[8];
          load8<T>(x + m * x_stride + 32 * c + 8 * u, xv);
          if constexpr (Code == 0) {
            float t = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) t = fmaf(w[i], xv[i], t);
            acc[m] = fmaf(s[j], t, acc[m]);
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[m] = fmaf(w[i], xv[i], acc[m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MaxM; ++m)
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  if constexpr (Mode == kSwiglu) {
    // Row group gb of the block (g's parity, as 4 RPW is even): its sum to shared memory; the gate group (even)
    // reads its up group's (gb + 1, in the same warp or the next).
    float* sums = &part[0][0];
    const int gb = warp * RPW + lane / LPR;
    if (sub == 0) sums[gb] = acc[0];
    __syncthreads();
    if (sub != 0 || (g & 1) || !valid) return;
    const float gt = to_f(from_f<T>(acc[0])), ut = to_f(from_f<T>(sums[gb + 1]));
    y[n] = from_f<T>(ops::swiglu_value(gt, ut));
  } else if constexpr (Mode == kCombine) {
    const int k = blockDim.x >> 5, rl = lane / LPR;
    if (sub == 0) part[warp][rl] = to_f(from_f<T>(acc[0]));  // the slot's output, rounded to T as ye
    __syncthreads();
    if (threadIdx.x >= RPW) return;
    const int nr = blockIdx.x * RPW + threadIdx.x;
    if (nr >= rows) return;
    float sum = 0.0f;
    for (int sl = 0; sl < k; ++sl) sum = fmaf(part[sl][threadIdx.x], wts[blockIdx.y * k + sl], sum);
    y[nr] = ops::combine_into(y[nr], sum);
  } else {
    if (sub != 0 || !valid) return;
#pragma unroll
    for (int m = 0; m < MaxM; ++m)
      if (m < M) y[m * ldy + n] = from_f<T>(acc[m]);
  }
}

// ---- The tensor-core decode GEMV (Affine codes, T bf16 or fp16) ----------------------------------------------------
// Where K and G are multiples of 128, k_qmma replaces k_qgemv32 for bf16/fp16 activations: it needs about a third of
// the instructions per code, and the 4-bit products stop being bound by the instruction issue.
//   - A warp owns a tile of 16 weight rows (kSwiglu: gate rows n..n+7 as tile rows 0..7, their up rows as 8..15) and
//     reads it in chunks of 128 codes (one group: G is a multiple of 128). Lane (gid = lane / 4, t = lane % 4) loads
//     16 bytes (32 codes) of rows gid and gid + 8 per chunk: codes 32 t .. 32 t + 31 of the chunk.
//   - (q - z) in T is exact (z < 128; the packings hold z <= 16): the code's 4 bits OR'd into the mantissa of 2^7
//     (bf16) or 2^10 (fp16) give 2^b + q, minus 2^b + z. The 8 codes of a word pair up as (0, 4), (1, 5), (2, 6), (3, 7); the activations
//     are staged in shared memory in that order, so each word feeds two mma.m16n8k16 (A: the 16 rows, B: 8 columns
//     of activations, column j = activation row j; one row in MoE modes).
//   - Per chunk t = the 8 products' sum (exact products, the tensor core's fp32 sum), then acc += s t with s the
//     row's fp32 scale. KS warps split a tile's chunks (chunk c to warp c % KS); their sums are added in warp order.
//     KS is fixed by K alone (mma_split), so every mode gives the same bits as kPlain for a shape.
// Modes as k_qgemv32 (kCombine: a block holds slots x KS warps of one 16-row tile of one token).
inline constexpr int kMmaChunk = 128;     // codes per chunk and lane quad
inline constexpr int kMmaDepth = 4;       // chunks whose loads a warp has in flight (k_qmma kSwiglu: 2)
inline constexpr int kMmaMaxWarps = 16;   // per block
inline int mma_split(int K) {  // chunks per row 32+: 8 warps (the real o), 16+: 4 (q/k/v, gate_up), 8+: 2, else 1 (down)
  const int C = K / kMmaChunk;
  return C >= 32 ? 8 : C >= 16 ? 4 : C >= 8 ? 2 : 1;
}

// (q - z) for the codes of w at bits sh..sh+3 (low half) and sh+16..sh+19 (high half), as two T; zz: 2^b + z twice.
template <class T>
__device__ __forceinline__ std::uint32_t code_pair(std::uint32_t w, int sh, std::uint32_t zz) {
  constexpr std::uint32_t kBias = std::is_same_v<T, bf16> ? 0x43004300u : 0x64006400u;
  const std::uint32_t v = ((w >> sh) & 0x000F000Fu) | kBias;
  std::uint32_t r;
  if constexpr (std::is_same_v<T, bf16>) {
    __nv_bfloat162 a, b;
    std::memcpy(&a, &v, 4), std::memcpy(&b, &zz, 4);
    const __nv_bfloat162 d = __hsub2(a, b);
    std::memcpy(&r, &d, 4);
  } else {
    __half2 a, b;
    std::memcpy(&a, &v, 4), std::memcpy(&b, &zz, 4);
    const __half2 d = __hsub2(a, b);
    std::memcpy(&r, &d, 4);
  }
  return r;
}

// k_qmma's static shared memory: the split warps' sums, and kCombine's slot outputs.
struct MmaShared {
  float red[kMmaMaxWarps][32][4];
  float part[kMmaMaxWarps][16];
};

// Narrow (kCombine only): a block of at most 8 warps (slots x KS; the real shape's down: 8 slots x 1), bounded to 256
// threads, so it has the registers to hold 8 chunks in flight instead of 4: all 6 chunks of the real down's K 768 are
// loaded before its pdl_wait, none after (layer bench 48.1 -> 46.6 us, same machine). Taken where the grid fits in
// one wave at one block per multiprocessor (batch 1 at the real shape).
template <class T, int Mode, bool Narrow = false>
__global__ void __launch_bounds__(Mode == kCombine && !Narrow ? 32 * kMmaMaxWarps : 256)
    k_qmma(Args a, int KS, const T* __restrict__ X, int M, long long x_stride, int x_div, const std::int32_t* __restrict__ ids,
           T* __restrict__ Y, long long ldy, int rows, int pair, const float* __restrict__ wts) {
  extern __shared__ uint4 xs[];  // [nx][ldx]: activation rows, 16 bytes = 8 activations in pair order
  __shared__ MmaShared sh;
  auto& red = sh.red;
  auto& part = sh.part;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, t = lane & 3;
  const int ks = warp % KS;
  // Tile, matrix and staged activation rows of this warp.
  const int tile = Mode == kCombine ? blockIdx.x : blockIdx.x * (blockDim.x >> 5) / KS + warp / KS;
  const int sl = warp / KS;  // kCombine: slot of the token
  const int nx = Mode == kCombine ? pair : ids != nullptr ? 1 : M;
  // MoE: the matrix is ids[p], written by the router. kCombine (down) reads it before pdl_wait: the router runs two
  // kernels earlier, and the kernel between (gate_up) waits for it in every block before it lets this one start
  // (L2 load: no stale L1 line). So down's first weight loads overlap gate_up's tail. kPlain, kSwiglu: wait first.
  if (ids != nullptr && Mode != kCombine) pdl_wait();
  const int e = ids == nullptr ? 0 : Mode == kCombine ? __ldcg(ids + blockIdx.y * pair + sl) : ids[blockIdx.y];
  // kCombine: the slot weights (the router's) and the residual row (written before the router) of the block's output
  // rows, also before pdl_wait, by the 16 threads that finish the rows.
  float cw[kCombineMaxSlots] = {};
  T cres{};
  if constexpr (Mode == kCombine) {
    if (threadIdx.x < 16 && tile * 16 + static_cast<int>(threadIdx.x) < rows) {
#pragma unroll
      for (int s = 0; s < kCombineMaxSlots; ++s)
        if (s < pair) cw[s] = __ldcg(wts + blockIdx.y * pair + s);
      cres = __ldcg(Y + static_cast<long long>(blockIdx.y) * ldy + tile * 16 + threadIdx.x);
    }
  }
  int r0, r1;
  bool v0, v1;
  if constexpr (Mode == kSwiglu) {
    r0 = tile * 8 + gid, r1 = r0 + pair, v0 = v1 = r0 < rows;
  } else {
    r0 = tile * 16 + gid, r1 = r0 + 8, v0 = r0 < rows, v1 = r1 < rows;
  }
  const int C = a.K / kMmaChunk, W = a.K / 8;
  // Chunks in flight: 2 for gate_up+SwiGLU (fewer registers, so all of the real shape's blocks fit at once: 9.8 us
  // alone against 11.1 with 4), 8 for the narrow combine, 4 elsewhere (q/k/v, o and down are slower with 2). Only
  // when loads are issued.
  constexpr int Depth = Mode == kSwiglu ? 2 : Narrow ? 8 : kMmaDepth;
  const int nc = (C - ks + KS - 1) / KS;  // this warp's chunks: ks, ks + KS, ...
  const uint4* w0 = reinterpret_cast<const uint4*>(a.words + (static_cast<long long>(e) * a.N + (v0 ? r0 : 0)) * W) + t;
  const uint4* w1 = reinterpret_cast<const uint4*>(a.words + (static_cast<long long>(e) * a.N + (v1 ? r1 : 0)) * W) + t;
  const float* s0p = a.scales + e * a.spm + static_cast<long long>(v0 ? r0 : 0) * a.ng;
  const float* s1p = a.scales + e * a.spm + static_cast<long long>(v1 ? r1 : 0) * a.ng;
  const std::uint8_t* z0p = a.zeros + e * a.spm + static_cast<long long>(v0 ? r0 : 0) * a.ng;
  const std::uint8_t* z1p = a.zeros + e * a.spm + static_cast<long long>(v1 ? r1 : 0) * a.ng;
  const int gpc = a.G / kMmaChunk;  // chunks per group
  uint4 q0[Depth], q1[Depth];
  float s0[Depth], s1[Depth];
  std::uint32_t z0[Depth], z1[Depth];
  // The codes with an evict-first policy: a decode step reads them once (common.cuh); about 0.7 us less per layer
  // in the layer bench, as it keeps the L2 prefetch's bytes (the next layer's KV and weights) in L2.
  const std::uint64_t pol = l2_evict_first();
  auto load = [&](int j, int i) {
    const int c = ks + KS * i, gi = c / gpc;
    q0[j] = q1[j] = make_uint4(0u, 0u, 0u, 0u);
    s0[j] = s1[j] = 0.0f;
    z0[j] = z1[j] = 0u;
    if (i >= nc) return;
    if (v0) q0[j] = ldg16(w0 + 4 * c, pol), s0[j] = __ldg(s0p + gi), z0[j] = __ldg(z0p + gi);
    if (v1) q1[j] = ldg16(w1 + 4 * c, pol), s1[j] = __ldg(s1p + gi), z1[j] = __ldg(z1p + gi);
  };
#pragma unroll
  for (int j = 0; j < Depth; ++j) load(j, j);
  pdl_begin();
  // Stage the activation rows: word w (activations 8 w .. 8 w + 7, chunk w / 16, lane quad slot (w / 4) % 4, word
  // w % 4 of that slot's 16 bytes) in pair order (0, 4), (1, 5), (2, 6), (3, 7).
  const int ldx = W + 4;  // 16-byte units; + 4 puts consecutive rows 64 bytes apart in the banks
  for (int i = threadIdx.x; i < nx * W; i += blockDim.x) {
    const int r = i / W, w = i % W;
    const T* xr = Mode == kCombine ? X + static_cast<long long>(blockIdx.y * pair + r) * x_stride
                  : ids != nullptr ? X + static_cast<long long>(blockIdx.y / x_div) * x_stride
                                   : X + static_cast<long long>(r) * x_stride;
    const uint4 v = *reinterpret_cast<const uint4*>(xr + 8 * w);
    xs[r * ldx + (w & ~15) + (w & 3) * 4 + ((w >> 2) & 3)] =
        make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632), __byte_perm(v.y, v.w, 0x5410),
                   __byte_perm(v.y, v.w, 0x7632));
  }
  __syncthreads();
  const int xr = Mode == kCombine ? sl : gid < nx ? gid : 0;  // the B column's activation row
  const uint4* xb = xs + xr * ldx + t;
  constexpr std::uint32_t kBiasLo = std::is_same_v<T, bf16> ? 0x4300u : 0x6400u;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int i0 = 0; i0 < nc; i0 += Depth) {
#pragma unroll
    for (int j = 0; j < Depth; ++j) {
      const int i = i0 + j;
      if (i >= nc) break;
      const int c = ks + KS * i;
      const std::uint32_t zz0 = (kBiasLo | z0[j]) * 0x00010001u, zz1 = (kBiasLo | z1[j]) * 0x00010001u;
      const std::uint32_t ws0[4] = {q0[j].x, q0[j].y, q0[j].z, q0[j].w}, ws1[4] = {q1[j].x, q1[j].y, q1[j].z, q1[j].w};
      float d[2][4] = {};  // two chains of mma (words 0, 1 and 2, 3), so that fewer wait on the one before
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint4 xv = xb[16 * c + 4 * u];
        const std::uint32_t lo[4] = {code_pair<T>(ws0[u], 0, zz0), code_pair<T>(ws1[u], 0, zz1), code_pair<T>(ws0[u], 4, zz0),
                                     code_pair<T>(ws1[u], 4, zz1)};
        mma16816<T>(d[u >> 1], lo, xv.x, xv.y);
        const std::uint32_t hi[4] = {code_pair<T>(ws0[u], 8, zz0), code_pair<T>(ws1[u], 8, zz1), code_pair<T>(ws0[u], 12, zz0),
                                     code_pair<T>(ws1[u], 12, zz1)};
        mma16816<T>(d[u >> 1], hi, xv.z, xv.w);
      }
      acc[0] = fmaf(s0[j], d[0][0] + d[1][0], acc[0]), acc[1] = fmaf(s0[j], d[0][1] + d[1][1], acc[1]);
      acc[2] = fmaf(s1[j], d[0][2] + d[1][2], acc[2]), acc[3] = fmaf(s1[j], d[0][3] + d[1][3], acc[3]);
      load(j, i + Depth);
    }
  }
  // The KS warps of a tile, added in warp order into the first.
  if (KS > 1) {
#pragma unroll
    for (int v = 0; v < 4; ++v) red[warp][lane][v] = acc[v];
    __syncthreads();
    for (int k = 1; ks == 0 && k < KS; ++k)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[v] += red[warp + k][lane][v];
  }
  const bool first = ks == 0;
  if constexpr (Mode == kCombine) {
    // acc[0], acc[2] of lanes t == 0: the slot's outputs of rows gid, gid + 8, rounded to T as ye.
    if (first && t == 0) part[sl][gid] = to_f(from_f<T>(acc[0])), part[sl][gid + 8] = to_f(from_f<T>(acc[2]));
    __syncthreads();
    if (threadIdx.x >= 16) return;
    const int nr = tile * 16 + threadIdx.x;
    if (nr >= rows) return;
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kCombineMaxSlots; ++s)
      if (s < pair) sum = fmaf(part[s][threadIdx.x], cw[s], sum);
    Y[static_cast<long long>(blockIdx.y) * ldy + nr] = ops::combine_into(cres, sum);
  } else if constexpr (Mode == kSwiglu) {
    if (!first || t != 0 || !v0) return;
    const float gt = to_f(from_f<T>(acc[0])), ut = to_f(from_f<T>(acc[2]));
    Y[static_cast<long long>(blockIdx.y) * ldy + r0] = from_f<T>(ops::swiglu_value(gt, ut));
  } else {
    if (!first) return;
    T* y = ids != nullptr ? Y + static_cast<long long>(blockIdx.y) * ldy : Y;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = 2 * t + h;  // the C fragment's columns 2 t, 2 t + 1
      if (m >= (ids != nullptr ? 1 : M)) break;
      if (v0) y[m * ldy + r0] = from_f<T>(acc[h]);
      if (v1) y[m * ldy + r1] = from_f<T>(acc[2 + h]);
    }
  }
}

// W_e as T [N, K] row-major in the module's own input order (row stride ldw), for cuBLASLt.
template <class T, int Code, int Round>
__global__ void k_qdequant(Args a, int e, T* __restrict__ out, long long ldw) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = a.code[threadIdx.x];
  __syncthreads();
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;  // word index in the matrix
  const int W = a.K / 8;
  if (i >= static_cast<long long>(a.N) * W) return;
  const int n = static_cast<int>(i / W), c = static_cast<int>(i % W);
  const std::uint32_t ws = a.words[static_cast<long long>(e) * a.N * W + i];
  float s, zb;
  group_of<Code>(a, e, n, 8 * c, s, zb);
  const std::int32_t* perm = a.perm != nullptr ? a.perm + static_cast<long long>(e) * a.K : nullptr;
  // Without a permutation the word's 8 weights are contiguous: one 8-element store (16 bytes in bf16/fp16).
  if (perm == nullptr && ldw % 8 == 0 && reinterpret_cast<std::uintptr_t>(out) % (8 * sizeof(T)) == 0) {
    struct alignas(8 * sizeof(T)) Eight {
      T v[8];
    } o;
#pragma unroll
    for (int j = 0; j < 8; ++j) o.v[j] = from_f<T>(weight<Code, Round>(code, (ws >> (4 * j)) & 0xFu, s, zb));
    *reinterpret_cast<Eight*>(out + n * ldw + 8 * c) = o;
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int k = perm != nullptr ? perm[8 * c + j] : 8 * c + j;
    out[n * ldw + k] = from_f<T>(weight<Code, Round>(code, (ws >> (4 * j)) & 0xFu, s, zb));
  }
}

// E packed matrices of one shape on the device.
class Weight {
 public:
  // E matrices whose rows are the given parts' rows in order (part j of every matrix packed like parts[j]; the
  // parts must be concatenable, quant::can_concat, and each matrix's permutation is its first part's).
  void allocate(int E, const std::vector<const quant::Packed4*>& parts) {
    if (parts.empty() || E < 1) throw Error("q::Weight", "no matrices");
    if (parts.size() > 1 && !quant::can_concat(parts)) throw Error("q::Weight", "parts of one weight must share their packing");
    const quant::Packed4& a = *parts.front();
    E_ = E;
    N_ = 0;
    row0_.clear();
    for (const quant::Packed4* p : parts) row0_.push_back(N_), N_ += static_cast<int>(p->N);
    K_ = static_cast<int>(a.K), G_ = static_cast<int>(a.G), ng_ = static_cast<int>(a.groups_per_row());
    code_ = static_cast<int>(a.code);
    round_ = a.code == quant::Packed4::Code::Nf4 ? (a.nf4_dtype == DType::BF16 ? kRoundBf16 : a.nf4_dtype == DType::F16 ? kRoundF16 : kRoundNone)
                                                 : kRoundNone;
    spm_ = a.code == quant::Packed4::Code::Affine ? static_cast<long long>(N_) * ng_ : (static_cast<long long>(N_) * K_ + G_ - 1) / G_;
    const std::size_t e = static_cast<std::size_t>(E);
    words_.resize(e * N_ * (K_ / 8));
    scales_.resize(e * static_cast<std::size_t>(spm_));
    if (a.code == quant::Packed4::Code::Affine) zeros_.resize(e * static_cast<std::size_t>(spm_));
    if (!a.perm.empty()) perm_.resize(e * K_);
  }

  // Copies part j of matrix e (packed like allocate's parts[j]) through `up`; returns once the host data may go.
  void copy_part(int e, int j, const quant::Packed4& p, PinnedUploader& up) {
    const long long row0 = row0_.at(static_cast<std::size_t>(j)), W = K_ / 8;
    if (p.K != K_ || p.G != G_ || static_cast<int>(p.code) != code_ || p.perm.empty() != (perm_.get() == nullptr) ||
        p.words.size() != static_cast<std::size_t>(p.N * W) || p.scales.size() != static_cast<std::size_t>(p.scale_count()))
      throw Error("q::Weight", "part packed unlike the weight's layout");
    const long long s0 = code_ == 0 ? row0 * ng_ : row0 * K_ / G_;
    up.copy(words_.get() + (static_cast<long long>(e) * N_ + row0) * W, p.words.data(), p.words.size() * sizeof(std::uint32_t));
    up.copy(scales_.get() + e * spm_ + s0, p.scales.data(), p.scales.size() * sizeof(float));
    if (!p.zeros.empty()) up.copy(zeros_.get() + e * spm_ + s0, p.zeros.data(), p.zeros.size());
    if (j == 0 && !p.perm.empty()) up.copy(perm_.get() + static_cast<long long>(e) * K_, p.perm.data(), p.perm.size() * sizeof(std::int32_t));
    up.finish();
  }

  // E matrices of one part each.
  void upload(const std::vector<quant::Packed4>& mats, PinnedUploader& up) {
    if (mats.empty()) throw Error("q::Weight", "no matrices");
    allocate(static_cast<int>(mats.size()), {&mats.front()});
    for (std::size_t i = 0; i < mats.size(); ++i) copy_part(static_cast<int>(i), 0, mats[i], up);
  }

  std::size_t bytes_per_matrix() const {
    if (E_ == 0) return 0;
    return (words_.size() * 4 + scales_.size() * 4 + zeros_.size() + perm_.size() * 4) / static_cast<std::size_t>(E_);
  }

  int N() const { return N_; }
  int K() const { return K_; }
  // Appends the device arrays of all E matrices (for ops::prefetch_l2).
  void device_ranges(ops::PrefetchList& l) const {
    l.add(words_.get(), words_.size() * sizeof(std::uint32_t));
    l.add(scales_.get(), scales_.size() * sizeof(float));
    l.add(zeros_.get(), zeros_.size());
    l.add(perm_.get(), perm_.size() * sizeof(std::int32_t));
  }

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
  // MoE decode gate_up with the SwiGLU: for slot p and n < N / 2, Y[p, n] = silu(T(W_e[n] x)) * T(W_e[N / 2 + n] x),
  // x = X[p / x_div], e = ids[p] (rounded as gate_up's outputs, then ops::swiglu: the same bits as moe_gemv then
  // swiglu). Returns false, launching nothing, where k_qgemv32's kSwiglu does not apply (the caller runs both).
  template <class T>
  bool moe_gemv_swiglu(const T* X, long long x_stride, int x_div, const std::int32_t* ids, int slots, T* Y, long long ldy,
                       cudaStream_t s = 0) const {
    if (!chunked(X, x_stride) || N_ % 2 != 0) return false;
    if (slots == 0) return true;
    if (mma(X, x_stride, 1)) return run_mma<T, kSwiglu>(X, 1, x_stride, x_div, ids, slots, Y, ldy, N_ / 2, N_ / 2, nullptr, s), true;
    by_code([&](auto code, auto round) {
      constexpr int Code = decltype(code)::value, Round = decltype(round)::value;
      run32<T, Code, Round, 1, kSwiglu>(X, 1, x_stride, x_div, ids, slots, Y, ldy, N_ / 2, N_ / 2, nullptr, s);
    });
    return true;
  }
  // MoE decode down with the combine: for token r < tokens (slots r k .. r k + k - 1, activation row p of X for
  // slot p), Xres[r] += T(sum_s T(W_{ids[p]} X[p]) wts[p]) in slot order: the bits of moe_gemv then
  // ops::moe_combine. Returns false, launching nothing, where kCombine does not apply. The ids, the weights and Xres
  // must be written by kernels at least two launches earlier in the stream (k_qmma reads them before its pdl_wait;
  // every fpf kernel waits in each block before it lets the next start).
  template <class T>
  bool moe_gemv_combine(const T* X, long long x_stride, const std::int32_t* ids, const float* wts, int tokens, int k, T* Xres,
                        long long ldres, cudaStream_t s = 0) const {
    if (!chunked(X, x_stride) || k < 1 || k > kCombineMaxSlots) return false;
    if (mma(X, x_stride, k)) {  // a block: k slots x mma_split warps
      if (k * mma_split(K_) > kMmaMaxWarps) return false;
      if (tokens > 0) run_mma<T, kCombine>(X, 1, x_stride, 1, ids, tokens * k, Xres, ldres, N_, k, wts, s);
      return true;
    }
    if (tokens == 0) return true;
    by_code([&](auto code, auto round) {
      constexpr int Code = decltype(code)::value, Round = decltype(round)::value;
      run32<T, Code, Round, 1, kCombine>(X, 1, x_stride, 1, ids, tokens * k, Xres, ldres, N_, k, wts, s);
    });
    return true;
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
    a.gshift = -1;
    for (int sh = 0; sh < 30; ++sh)
      if ((8 << sh) == G_) a.gshift = sh;
    a.spm = spm_;
    for (int i = 0; i < 16; ++i) a.code[i] = quant::kNf4Code[i];
    return a;
  }

  // 8 activations per aligned load, in the module's own order.
  template <class T>
  bool wide(const T* X, long long x_stride) const {
    return perm_.get() == nullptr && reinterpret_cast<std::uintptr_t>(X) % 16 == 0 && (x_stride * sizeof(T)) % 16 == 0;
  }
  // k_qgemv32 applies: wide, and 32-code chunks that stay in one group.
  template <class T>
  bool chunked(const T* X, long long x_stride) const {
    return wide(X, x_stride) && K_ % 32 == 0 && G_ % 32 == 0;
  }

  // k_qmma applies: Affine codes, T bf16 or fp16, chunked, K and G multiples of 128, and nx activation rows fit in
  // shared memory.
  template <class T>
  bool mma(const T* X, long long x_stride, int nx) const {
    return !std::is_same_v<T, float> && code_ == 0 && chunked(X, x_stride) && K_ % kMmaChunk == 0 && G_ % kMmaChunk == 0 &&
           mma_smem(nx) <= kMmaMaxSmem;
  }
  static constexpr std::size_t kMmaMaxSmem = 96 * 1024;
  std::size_t mma_smem(int nx) const { return static_cast<std::size_t>(nx) * (K_ / 8 + 4) * 16; }

  // pair: kSwiglu the up rows' offset; kCombine the slots per token (slots = tokens k).
  template <class T, int Mode>
  void run_mma(const T* X, int M, long long xs, int xd, const std::int32_t* ids, int slots, T* Y, long long ldy, int rows,
               int pair, const float* wts, cudaStream_t s) const {
    if constexpr (!std::is_same_v<T, float>) {
      const int KS = mma_split(K_);
      const std::size_t smem = mma_smem(Mode == kCombine ? pair : ids != nullptr ? 1 : M);
      auto* k = k_qmma<T, Mode>;
      if constexpr (Mode == kCombine) {
        // The narrow variant's registers leave one block per multiprocessor: only where the grid is one wave.
        if (pair * KS <= 8 && blocks_for(static_cast<std::size_t>(rows), 16) * static_cast<std::size_t>(slots / pair) <=
                                   static_cast<std::size_t>(device_info().sms))
          k = k_qmma<T, Mode, true>;
      }
      if (smem + sizeof(MmaShared) > 48 * 1024)  // past the default limit (static + dynamic): opt in
        FPF_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      if constexpr (Mode == kCombine) {  // a block: one 16-row tile of every slot of one token
        const dim3 grid(blocks_for(static_cast<std::size_t>(rows), 16), static_cast<unsigned>(slots / pair));
        cuda::launch("qmma", k, grid, 32 * pair * KS, smem, s, args(), KS, X, M, xs, xd, ids, Y, ldy, rows, pair, wts);
      } else {  // a block: max(4, KS) warps, tiles of KS warps
        const std::size_t tiles = (static_cast<std::size_t>(rows) + (Mode == kSwiglu ? 7 : 15)) / (Mode == kSwiglu ? 8 : 16);
        const int warps = std::max(4, KS);
        const dim3 grid(blocks_for(tiles, static_cast<unsigned>(warps / KS)), static_cast<unsigned>(slots));
        cuda::launch("qmma", k, grid, 32 * warps, smem, s, args(), KS, X, M, xs, xd, ids, Y, ldy, rows, pair, wts);
      }
    }
  }

  // Rows of at least 128 chunks take 32 lanes (4 chunks per batch), shorter rows of at least 48 chunks 32 lanes (2
  // chunks), others 8 lanes (4 chunks): at least 2 chunks per lane where the row is long enough. The lanes per row
  // fix the order of the sums, so every mode takes the same choice for a shape.
  // pair: kSwiglu the up rows' offset; kCombine the slots per token (slots = tokens k).
  template <class T, int Code, int Round, int MaxM, int Mode>
  void run32(const T* X, int M, long long xs, int xd, const std::int32_t* ids, int slots, T* Y, long long ldy, int rows,
             int pair, const float* wts, cudaStream_t s) const {
    const int C = K_ / 32;
    auto go = [&](auto lpr, auto cpl) {
      constexpr int LPR = decltype(lpr)::value, CPL = decltype(cpl)::value, RPW = 32 / LPR;
      auto* k = k_qgemv32<T, Code, Round, MaxM, LPR, CPL, Mode>;
      if constexpr (Mode == kCombine) {  // a block: RPW rows of every slot of one token
        const dim3 grid(blocks_for(static_cast<std::size_t>(rows), RPW), static_cast<unsigned>(slots / pair));
        cuda::launch("qgemv32", k, grid, 32 * pair, 0, s, args(), X, M, xs, xd, ids, Y, ldy, rows, pair, wts);
      } else {  // a block: 4 warps of RPW row groups (kSwiglu: gate and up groups alternate)
        const std::size_t groups = static_cast<std::size_t>(rows) * (Mode == kSwiglu ? 2 : 1);
        const dim3 grid(blocks_for(groups, 4 * RPW), static_cast<unsigned>(slots));
        cuda::launch("qgemv32", k, grid, 128, 0, s, args(), X, M, xs, xd, ids, Y, ldy, rows, pair, wts);
      }
    };
    using std::integral_constant;
    if (C >= 128) go(integral_constant<int, 32>{}, integral_constant<int, 4>{});
    else if (C >= 48) go(integral_constant<int, 32>{}, integral_constant<int, 2>{});
    else go(integral_constant<int, 8>{}, integral_constant<int, 4>{});
  }

  template <class T>
  void launch(const T* X, int M, long long x_stride, int x_div, const std::int32_t* ids, int slots, T* Y, long long ldy,
              cudaStream_t s) const {
    if (M == 0) return;
    if (M > ops::kGemvMaxRows) throw Error("q::Weight::gemv", "at most " + std::to_string(ops::kGemvMaxRows) + " rows");
    if (mma(X, x_stride, ids != nullptr ? 1 : M)) return run_mma<T, kPlain>(X, M, x_stride, x_div, ids, slots, Y, ldy, N_, 0, nullptr, s);
    if (chunked(X, x_stride)) {
      const int mm = M == 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
      auto rows = [&](auto code, auto round) {
        constexpr int Code = decltype(code)::value, Round = decltype(round)::value;
        switch (mm) {
          case 1: return run32<T, Code, Round, 1, kPlain>(X, M, x_stride, x_div, ids, slots, Y, ldy, N_, 0, nullptr, s);
          case 2: return run32<T, Code, Round, 2, kPlain>(X, M, x_stride, x_div, ids, slots, Y, ldy, N_, 0, nullptr, s);
          case 4: return run32<T, Code, Round, 4, kPlain>(X, M, x_stride, x_div, ids, slots, Y, ldy, N_, 0, nullptr, s);
          default: return run32<T, Code, Round, 8, kPlain>(X, M, x_stride, x_div, ids, slots, Y, ldy, N_, 0, nullptr, s);
        }
      };
      return by_code(rows);
    }
    const bool wide = this->wide(X, x_stride);
    const int mm = M == 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
    const int key = ((code_ * 3 + round_) * 4 + (mm == 1 ? 0 : mm == 2 ? 1 : mm == 4 ? 2 : 3)) * 2 + (wide ? 1 : 0);
    dispatch<T>(key, X, M, x_stride, x_div, ids, slots, Y, ldy, s);
  }

  // f(code, round) with the packing's Code and Round as std::integral_constant.
  template <class F>
  void by_code(F&& f) const {
    using std::integral_constant;
    switch (code_ * 3 + round_) {
      case 0: return f(integral_constant<int, 0>{}, integral_constant<int, kRoundNone>{});
      case 3: return f(integral_constant<int, 1>{}, integral_constant<int, kRoundNone>{});
      case 4: return f(integral_constant<int, 1>{}, integral_constant<int, kRoundBf16>{});
      case 5: return f(integral_constant<int, 1>{}, integral_constant<int, kRoundF16>{});
      default: throw Error("q::Weight", "bad code");
    }
  }

  template <class T, int Code, int Round, int MaxM, bool Wide>
  void run(const T* X, int M, long long x_stride, int x_div, const std::int32_t* ids, int slots, T* Y, long long ldy,
           cudaStream_t s) const {
    const dim3 grid(blocks_for(static_cast<std::size_t>(N_), 8), static_cast<unsigned>(slots));
    cuda::launch("qgemv", k_qgemv<T, Code, Round, MaxM, Wide>, grid, 256, 0, s, args(), X, M, x_stride, x_div, ids, Y, ldy);
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
  std::vector<int> row0_;
  DeviceBuffer<std::uint32_t> words_;
  DeviceBuffer<float> scales_;
  DeviceBuffer<std::uint8_t> zeros_;
  DeviceBuffer<std::int32_t> perm_;
};

}  // namespace fpf::cuda::q
