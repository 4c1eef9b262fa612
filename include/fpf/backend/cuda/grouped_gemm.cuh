#pragma once
// Grouped GEMM for the MoE experts of the prefill, one launch for all experts (bf16 / fp16, tensor cores).
//
// What it computes: the rows of X [total_rows, K] are grouped by expert (rows offsets[e] <= r < offsets[e+1] belong
// to expert e, offsets[0] = 0, offsets[E] = total_rows, a group may be empty); W is [E, N, K] row-major (PyTorch
// Linear, per expert [out, in]). For every row r of expert e:
//   Y[r, n] = round_to_T( sum_k X[r, k] * W[e, n, k] ),   fp32 accumulation, rounded once (nearest even).
// The host knows E and total_rows only: the per-expert counts are read on the device by every block from offsets.
//
// Tiles and schedule (both kernels): expert e's rows are cut into ceil(M_e / BM) m-tiles (BM = 128), N into n-tiles.
// Each block builds, from offsets, the prefix sums of m-tiles per expert in shared memory; the tile index t maps to
// (expert, m-tile, n-tile) in that order (n fastest: the blocks that run together work on a few experts, whose X rows
// and W stay in L2 while they do). Rows of a tile past its group's end are computed and never written; the output
// goes through shared memory and leaves in 16-byte coalesced stores (full 128-byte lines) of the group's rows only.
//  - sm_90a (H100/H200), k_gg_wgmma: a persistent kernel (one block per SM, tiles t = blockIdx.x + i * gridDim.x),
//    CTA tile 128 x 256 x 64, 3 warpgroups: warpgroup 0 (one thread) streams X and W slabs with the bulk tensor copy
//    engine (TMA, 128-byte swizzle, OOB zero fill) into a 4-stage shared-memory ring (mbarriers full/empty);
//    warpgroups 1 and 2 each own 64 rows x 256 columns and run wgmma.m64n256k16 (fp32 accumulators in registers).
//    An expert's last m-tile with at most 64 rows left runs as a "half tile": both warpgroups take those 64 rows,
//    128 columns each (wgmma.m64n128k16), halving the padding. Rows past total_rows load as zeros; rows past the
//    group's end but inside X hold the next expert's rows, which only ever meet their own output rows.
//  - other GPUs (and sm_90 builds without the "a" features), k_gg_mma: mma.sync.m16n8k16, CTA tile 128 x 128 x 32,
//    8 warps of 64 x 32, cp.async 4-stage pipeline, shared rows padded by 16 bytes (ldmatrix conflict-free); rows
//    past the group's end and columns past K load as zeros (cp.async src-size 0). One tile per block.
//
// Order of the K reduction (fixed): for every output element, one fp32 accumulator runs over K in ascending order,
// 16 at a time: acc = mma(acc, X[r, k:k+16], W[e, n, k:k+16]) for k = 0, 16, 32, ... (the tensor core's sum of 16
// products and its add into acc are one fixed hardware operation). No split-K, no atomics, no reduction across
// blocks: results are bit-identical from run to run. Which path runs depends only on the device and the build, so
// on one machine the order is the same for any M_e and any batch.
// Row independence: an output element depends only on its own X row and W[e, n, :]; the tensor-core step computes
// each element of the 16 x 8 (mma.sync) or 64 x N (wgmma) block from its row and column alone, so a row's value
// does not depend on its position in a tile, on the other rows, or on how many tokens share its expert (checked on
// the H100 with the prefill's shapes: every row bit-identical when all the other experts' counts change, full tiles
// becoming half tiles and back; both paths). Measured there (bf16, E = 128, 48000 rows, counts 0..900 around 375):
// gate_up 1536 x 2048 in 0.50 ms (~600 TFLOP/s of useful work), down 2048 x 768 in 0.285 ms (~530 TFLOP/s);
// cuBLASLt strided-batched, padded to the largest count: 0.85 and 0.48 ms. The outputs equal cuBLASLt's bit for bit
// there. The mma.sync path: 1.19 and 0.62 ms.
//
// Interface: grouped_linear<T>(X, d_offsets [E + 1] on the device, E, total_rows, W, N, K, Y, stream), T = bf16 or
// fp16. Needs K % 8 == 0, N even, X and W 16-byte aligned, Y 4-byte aligned; the sm_90a path also N % 8 == 0 and Y
// 16-byte aligned (else the mma.sync path runs). The model's shapes are multiples of 16.
#include <cuda.h>  // CUtensorMap (types only; the encoder is fetched through the runtime, no -lcuda)
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include <fpf/backend/cuda/common.cuh>

namespace fpf::cuda {
namespace gg_detail {

__device__ __forceinline__ unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void st_shared_u32(unsigned a, std::uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(unsigned a) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
  return v;
}

// ---- Tile schedule ------------------------------------------------------------------------------------------------
// Warp 0 writes s_off[0..E] = offsets and s_mt[0..E] = prefix sums of ceil(M_e / BM); the caller synchronises.
template <int BM>
__device__ __forceinline__ void build_schedule(const std::int32_t* __restrict__ offsets, int E, int* s_off, int* s_mt) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  int carry = 0;
  for (int base = 0; base < E; base += 32) {
    const int e = base + lane;
    int v = 0;
    if (e < E) {
      const int a = offsets[e], b = offsets[e + 1];
      s_off[e] = a;
      v = (b - a + BM - 1) / BM;
    }
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, v, d);
      if (lane >= d) v += u;
    }
    if (e < E) s_mt[e + 1] = carry + v;
    carry += __shfl_sync(0xffffffffu, v, 31);
  }
  if (lane == 0) {
    s_mt[0] = 0;
    s_off[E] = offsets[E];
  }
}

struct Tile {
  int e, n, row0, rows;  // expert, n-tile, first row (global), rows of the tile inside the group (1..BM)
};

// Tile t < s_mt[E] * nN -> (expert, m-tile, n-tile), n fastest.
template <int BM>
__device__ __forceinline__ Tile decode_tile(int t, int nN, int E, const int* s_off, const int* s_mt) {
  const int g = t / nN;
  int lo = 0, hi = E;  // s_mt[lo] <= g < s_mt[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (s_mt[mid] <= g) lo = mid;
    else hi = mid;
  }
  const int local = t - s_mt[lo] * nN;
  Tile r;
  r.e = lo;
  r.n = local % nN;
  r.row0 = s_off[lo] + (local / nN) * BM;
  r.rows = min(BM, s_off[lo + 1] - r.row0);
  return r;
}

// ---- mma.sync path (sm_80+) -----------------------------------------------------------------------------------------
constexpr int kMmBM = 128, kMmBN = 128, kMmBK = 32, kMmStages = 4, kMmThreads = 256;
constexpr int kMmLd = kMmBK + 8;  // shared row stride (elements): 80 bytes, 8 rows hit 8 distinct 16-byte bank groups
constexpr std::size_t kMmPipeBytes = static_cast<std::size_t>(kMmStages) * (kMmBM + kMmBN) * kMmLd * 2;

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {  // zero-fills when !valid
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(std::uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
template <class T>
__global__ void __launch_bounds__(kMmThreads, 2)
    k_gg_mma(const T* __restrict__ X, const std::int32_t* __restrict__ offsets, int E, const T* __restrict__ W, int N,
             int K, T* __restrict__ Y, bool vec_store) {
  extern __shared__ __align__(16) unsigned char gg_mm_smem[];
  T* sA = reinterpret_cast<T*>(gg_mm_smem);
  T* sB = sA + kMmStages * kMmBM * kMmLd;
  int* s_off = reinterpret_cast<int*>(gg_mm_smem + kMmPipeBytes);
  int* s_mt = s_off + E + 1;
  build_schedule<kMmBM>(offsets, E, s_off, s_mt);
  __syncthreads();
  const int nN = (N + kMmBN - 1) / kMmBN;
  const int t = blockIdx.x;
  if (t >= s_mt[E] * nN) return;
  const Tile tile = decode_tile<kMmBM>(t, nN, E, s_off, s_mt);
  const int n0 = tile.n * kMmBN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;

  // Each thread copies 2 16-byte chunks of A and 2 of B per stage: chunk c = tid + 256 i, row c / 4, column 8 (c % 4).
  const T* gA[2];
  const T* gB[2];
  bool vA[2], vB[2];
  int sOff[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = tid + kMmThreads * i, row = c >> 2, kc = (c & 3) * 8;
    vA[i] = row < tile.rows;
    vB[i] = n0 + row < N;
    gA[i] = X + static_cast<std::size_t>(tile.row0 + (vA[i] ? row : 0)) * K + kc;
    gB[i] = W + (static_cast<std::size_t>(tile.e) * N + n0 + (vB[i] ? row : 0)) * K + kc;
    sOff[i] = row * kMmLd + kc;
  }
  const int kIters = (K + kMmBK - 1) / kMmBK;
  auto load = [&](int kb, int slot) {
    const int k0 = kb * kMmBK;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int kc = ((tid + kMmThreads * i) & 3) * 8;
      const bool kv = k0 + kc < K;
      cp_async16(sA + slot * kMmBM * kMmLd + sOff[i], gA[i] + (kv ? k0 : 0), vA[i] && kv);
      cp_async16(sB + slot * kMmBN * kMmLd + sOff[i], gB[i] + (kv ? k0 : 0), vB[i] && kv);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

#pragma unroll
  for (int s = 0; s < kMmStages - 1; ++s) {
    if (s < kIters) load(s, s);
    cp_async_commit();
  }
  for (int kb = 0; kb < kIters; ++kb) {
    cp_async_wait<kMmStages - 2>();
    __syncthreads();  // stage kb landed for everyone; the slot refilled below was read in iteration kb - 1
    const int nk = kb + kMmStages - 1;
    if (nk < kIters) load(nk, nk % kMmStages);
    cp_async_commit();
    const T* a = sA + (kb % kMmStages) * kMmBM * kMmLd;
    const T* b = sB + (kb % kMmStages) * kMmBN * kMmLd;
#pragma unroll
    for (int kk = 0; kk < kMmBK / 16; ++kk) {
      std::uint32_t af[4][4], bfr[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) ldsm_x4(af[i], a + (wm * 64 + 16 * i + (lane & 15)) * kMmLd + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int jp = 0; jp < 2; ++jp) {
        std::uint32_t r[4];
        ldsm_x4(r, b + (wn * 32 + 16 * jp + (lane & 7) + ((lane >> 4) << 3)) * kMmLd + kk * 16 + ((lane >> 3) & 1) * 8);
        bfr[2 * jp][0] = r[0];
        bfr[2 * jp][1] = r[1];
        bfr[2 * jp + 1][0] = r[2];
        bfr[2 * jp + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma16816<T>(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
    }
  }
  cp_async_wait<0>();
  if (vec_store) {
    // Through shared memory (the ring is free now): the 128 x 128 tile as rows of 256 bytes, 16-byte chunks
    // XOR-swizzled by row (conflict-free both ways), then 16-byte coalesced stores of the rows inside the group.
    __syncthreads();
    const unsigned st = smem_u32(gg_mm_smem);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = wm * 64 + 16 * i + (lane >> 2);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c16 = wn * 4 + j;  // 16-byte chunk of the row
        const unsigned a = st + r * 256 + ((c16 ^ (r & 7)) << 4) + (lane & 3) * 4;
        st_shared_u32(a, pack2<T>(acc[i][j][0], acc[i][j][1]));
        st_shared_u32(a + 8 * 256, pack2<T>(acc[i][j][2], acc[i][j][3]));
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int id = tid + kMmThreads * i, r = id >> 4, c16 = id & 15;
      const uint4 v = ld_shared_v4(st + r * 256 + ((c16 ^ (r & 7)) << 4));
      const int c = n0 + 8 * c16;
      if (r < tile.rows && c < N) *reinterpret_cast<uint4*>(Y + static_cast<std::size_t>(tile.row0 + r) * N + c) = v;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = wm * 64 + 16 * i + (lane >> 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = n0 + wn * 32 + 8 * j + 2 * (lane & 3);
      if (c >= N) continue;
      if (r < tile.rows)
        *reinterpret_cast<std::uint32_t*>(Y + static_cast<std::size_t>(tile.row0 + r) * N + c) = pack2<T>(acc[i][j][0], acc[i][j][1]);
      if (r + 8 < tile.rows)
        *reinterpret_cast<std::uint32_t*>(Y + static_cast<std::size_t>(tile.row0 + r + 8) * N + c) = pack2<T>(acc[i][j][2], acc[i][j][3]);
    }
  }
}

// ---- wgmma + TMA path (sm_90a) --------------------------------------------------------------------------------------
constexpr int kWgBM = 128, kWgBN = 256, kWgBK = 64, kWgStages = 4, kWgThreads = 384;
constexpr unsigned kWgStageBytes = (kWgBM + kWgBN) * kWgBK * 2;  // one stage: X slab 16 KB + W slab 32 KB
constexpr std::size_t kWgPipeBytes = static_cast<std::size_t>(kWgStages) * kWgStageBytes;
constexpr unsigned kWgStoreBytes = 64 * 128;  // per consumer warpgroup: 64 rows x 64 columns of output
// Dynamic shared memory: 1024 (alignment) + ring + 2 store buffers + offsets and m-tile prefix sums.
inline std::size_t wg_smem_bytes(int E) {
  return 1024 + kWgPipeBytes + 2 * kWgStoreBytes + 2 * (static_cast<std::size_t>(E) + 1) * sizeof(int);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(std::uint64_t* b, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(std::uint64_t* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(std::uint64_t* b, unsigned parity) {
  asm volatile(
      "{\n.reg .pred P1;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(smem_u32(b)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, std::uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}
// Shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ std::uint64_t wg_desc(const void* p) {
  std::uint64_t d = (smem_u32(p) & 0x3FFFFu) >> 4;
  d |= static_cast<std::uint64_t>(1) << 16;            // leading byte offset (unused with 128-byte swizzle): 16 B
  d |= static_cast<std::uint64_t>(1024 >> 4) << 32;    // stride byte offset: 8 rows x 128 B
  d |= static_cast<std::uint64_t>(1) << 62;            // 128-byte swizzle
  return d;
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void reg_fence(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define FPF_GG_WGMMA_N256(TY)                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                   \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {"                     \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "  \
               "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "  \
               "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "  \
               "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "  \
               "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"  \
               "}, %128, %129, p, 1, 1, 0, 0;\n}\n"                                         \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),  \
                 "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),  \
                 "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),  \
                 "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),  \
                 "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),  \
                 "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),  \
                 "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),  \
                 "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),  \
                 "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])  \
               : "l"(da), "l"(db), "r"(scale_d))

#define FPF_GG_WGMMA_N128(TY)                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                   \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                     \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"  \
               "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                         \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
               : "l"(da), "l"(db), "r"(scale_d))

// d[0 .. NN/2) += A (64 x 16, descriptor da) * B (NN x 16, K-major, descriptor db); scale_d = 0 overwrites d.
template <class T, int NN>
__device__ __forceinline__ void wg_mma(float (&d)[128], std::uint64_t da, std::uint64_t db, int scale_d) {
  if constexpr (NN == 256) {
    if constexpr (std::is_same_v<T, bf16>) FPF_GG_WGMMA_N256("bf16");
    else FPF_GG_WGMMA_N256("f16");
  } else {
    if constexpr (std::is_same_v<T, bf16>) FPF_GG_WGMMA_N128("bf16");
    else FPF_GG_WGMMA_N128("f16");
  }
}

// One tile's main loop for a consumer warpgroup: A rows a_row.. (64), B rows b_row.. (NN) of each stage.
template <class T, int NN>
__device__ __forceinline__ void wg_mainloop(float (&acc)[128], const T* sA, const T* sB, std::uint64_t* full,
                                            std::uint64_t* empty, int a_row, int b_row, int kIters, int& s,
                                            unsigned& ph) {
  const bool signal = (threadIdx.x & 31) == 0;
  int ps = 0;
  for (int kb = 0; kb < kIters; ++kb) {
    mbar_wait(&full[s], ph);
    wg_fence();
    const T* a = sA + s * (kWgBM * kWgBK) + a_row * kWgBK;
    const T* b = sB + s * (kWgBN * kWgBK) + b_row * kWgBK;
#pragma unroll
    for (int kk = 0; kk < kWgBK / 16; ++kk) wg_mma<T, NN>(acc, wg_desc(a + 16 * kk), wg_desc(b + 16 * kk), (kb | kk) != 0);
    wg_commit();
    if (kb > 0) {
      wg_wait<1>();  // the previous stage's products are done: hand its slot back
      if (signal) mbar_arrive(&empty[ps]);
    }
    ps = s;
    if (++s == kWgStages) {
      s = 0;
      ph ^= 1;
    }
  }
  wg_wait<0>();
  reg_fence(acc);
  if (signal) mbar_arrive(&empty[ps]);
}

// Stores rows [r_base, r_base + 64) x columns [c_base, c_base + NN) of the tile from the accumulator fragments,
// 64 columns at a time through this warpgroup's 8 KB of shared memory (rows of 128 bytes, 16-byte chunks XOR-swizzled
// by row, so both the fragment writes and the row reads are conflict-free), then 16-byte coalesced stores of the
// rows inside the group (full 128-byte lines; nothing past the group's end or past N is written).
template <class T, int NN>
__device__ __forceinline__ void wg_store(const float (&acc)[128], T* __restrict__ Y, int N, const Tile& tile, int n0,
                                         int r_base, int c_base, unsigned stage, int bar_id) {
  const int wtid = threadIdx.x & 127, lane = threadIdx.x & 31;
  const int rl = 16 * (wtid >> 5) + (lane >> 2), q = lane & 3;  // fragment rows rl and rl + 8 (same rl & 7)
#pragma unroll
  for (int ch = 0; ch < NN / 64; ++ch) {
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const int j = 8 * ch + jj;
      const unsigned a = stage + rl * 128 + ((jj ^ (rl & 7)) << 4) + q * 4;
      st_shared_u32(a, pack2<T>(acc[4 * j], acc[4 * j + 1]));
      st_shared_u32(a + 8 * 128, pack2<T>(acc[4 * j + 2], acc[4 * j + 3]));
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(bar_id) : "memory");
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int id = wtid + 128 * i, row = id >> 3, c = id & 7;
      const uint4 v = ld_shared_v4(stage + row * 128 + ((c ^ (row & 7)) << 4));
      const int gc = n0 + c_base + 64 * ch + 8 * c;
      if (r_base + row < tile.rows && gc < N)
        *reinterpret_cast<uint4*>(Y + static_cast<std::size_t>(tile.row0 + r_base + row) * N + gc) = v;
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(bar_id) : "memory");
  }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Persistent: block b takes tiles b, b + gridDim.x, ... The barriers sit in static shared memory inside the sm_90a
// body only, so a build without it has a static size of 0, which the host reads (cudaFuncGetAttributes) to choose.
template <class T>
__global__ void __launch_bounds__(kWgThreads, 1)
    k_gg_wgmma(const __grid_constant__ CUtensorMap tmX, const __grid_constant__ CUtensorMap tmW,
               const std::int32_t* __restrict__ offsets, int E, int N, int K, T* __restrict__ Y) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(8) std::uint64_t bars[2 * kWgStages];
  extern __shared__ __align__(16) unsigned char gg_wg_smem[];
  unsigned char* base = gg_wg_smem + ((1024u - (smem_u32(gg_wg_smem) & 1023u)) & 1023u);
  T* sA = reinterpret_cast<T*>(base);
  T* sB = sA + kWgStages * kWgBM * kWgBK;
  int* s_off = reinterpret_cast<int*>(base + kWgPipeBytes + 2 * kWgStoreBytes);
  int* s_mt = s_off + E + 1;
  std::uint64_t* full = bars;
  std::uint64_t* empty = bars + kWgStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kWgStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  build_schedule<kWgBM>(offsets, E, s_off, s_mt);
  __syncthreads();
  const int nN = (N + kWgBN - 1) / kWgBN;
  const int total = s_mt[E] * nN;
  const int kIters = (K + kWgBK - 1) / kWgBK;
  const int wg = threadIdx.x >> 7;
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(&tmX)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(&tmW)) : "memory");
      int s = 0;
      unsigned ph = 0;
      for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const Tile tile = decode_tile<kWgBM>(t, nN, E, s_off, s_mt);
        const int wrow = tile.e * N + tile.n * kWgBN;
        for (int kb = 0; kb < kIters; ++kb) {
          mbar_wait(&empty[s], ph ^ 1);
          mbar_expect_tx(&full[s], kWgStageBytes);
          tma_load_2d(sA + s * (kWgBM * kWgBK), &tmX, kb * kWgBK, tile.row0, &full[s]);
          tma_load_2d(sB + s * (kWgBN * kWgBK), &tmW, kb * kWgBK, wrow, &full[s]);
          if (++s == kWgStages) {
            s = 0;
            ph ^= 1;
          }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1;
    const unsigned stage = smem_u32(base + kWgPipeBytes) + cw * kWgStoreBytes;
    int s = 0;
    unsigned ph = 0;
    float acc[128];
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
      const Tile tile = decode_tile<kWgBM>(t, nN, E, s_off, s_mt);
      const int n0 = tile.n * kWgBN;
      if (tile.rows <= 64) {  // half tile: rows 0..63, warpgroup cw takes columns [128 cw, 128 cw + 128)
        wg_mainloop<T, 128>(acc, sA, sB, full, empty, 0, 128 * cw, kIters, s, ph);
        wg_store<T, 128>(acc, Y, N, tile, n0, 0, 128 * cw, stage, 1 + cw);
      } else {
        wg_mainloop<T, 256>(acc, sA, sB, full, empty, 64 * cw, 0, kIters, s, ph);
        wg_store<T, 256>(acc, Y, N, tile, n0, 64 * cw, 0, stage, 1 + cw);
      }
    }
  }
#endif
}
#undef FPF_GG_WGMMA_N256
#undef FPF_GG_WGMMA_N128

// ---- Host side ------------------------------------------------------------------------------------------------------
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// 2-D map of a row-major [rows, K] matrix: boxes of box_rows x 64 elements, 128-byte swizzle, zeros out of bounds.
template <class T>
inline CUtensorMap tensor_map(const T* p, std::uint64_t rows, int K, int box_rows) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * sizeof(T)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kWgBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(&m, std::is_same_v<T, bf16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                                          2, const_cast<T*>(p), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw Error("cuda", "cuTensorMapEncodeTiled failed: " + std::to_string(static_cast<int>(r)));
  return m;
}

template <class T>
inline bool wgmma_built() {  // the sm_90a body is in this binary (see k_gg_wgmma)
  static const bool built = [] {
    cudaFuncAttributes a{};
    if (cudaFuncGetAttributes(&a, k_gg_wgmma<T>) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return a.sharedSizeBytes >= sizeof(std::uint64_t) * 2 * kWgStages;
  }();
  return built;
}

inline bool aligned(const void* p, std::uintptr_t a) { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

// Upper bound of the m-tiles over all experts: sum ceil(M_e / BM) <= total_rows / BM + min(E, total_rows).
inline long long max_m_tiles(int E, int total_rows, int BM) {
  return static_cast<long long>(total_rows) / BM + std::min(E, total_rows);
}

template <class T>
inline bool can_wgmma(const T* X, const T* W, const T* Y, int N, int K, int E) {
  const DeviceInfo& d = device_info();
  if (d.major != 9 || !wgmma_built<T>() || tensor_map_encoder() == nullptr) return false;
  const std::size_t smem = wg_smem_bytes(E) + 2 * kWgStages * 8;
  return aligned(X, 16) && aligned(W, 16) && aligned(Y, 16) && K % 8 == 0 && N % 8 == 0 &&
         smem <= static_cast<std::size_t>(d.smem_optin);
}

template <class T>
void launch_wgmma(const T* X, const std::int32_t* d_offsets, int E, int total_rows, const T* W, int N, int K, T* Y,
                  cudaStream_t s) {
  static bool attr[64] = {};
  if (bool& done = attr[device_info().id & 63]; !done) {
    cudaFuncAttributes a{};
    FPF_CUDA(cudaFuncGetAttributes(&a, k_gg_wgmma<T>));
    FPF_CUDA(cudaFuncSetAttribute(k_gg_wgmma<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  device_info().smem_optin - static_cast<int>(a.sharedSizeBytes)));
    done = true;
  }
  const CUtensorMap mx = tensor_map(X, static_cast<std::uint64_t>(total_rows), K, kWgBM);
  const CUtensorMap mw = tensor_map(W, static_cast<std::uint64_t>(E) * N, K, kWgBN);
  const long long tiles = max_m_tiles(E, total_rows, kWgBM) * ((N + kWgBN - 1) / kWgBN);
  const int grid = static_cast<int>(std::min<long long>(tiles, device_info().sms));
  const std::size_t smem = wg_smem_bytes(E);
  k_gg_wgmma<T><<<grid, kWgThreads, smem, s>>>(mx, mw, d_offsets, E, N, K, Y);
  FPF_CUDA_LAUNCH("k_gg_wgmma");
}

template <class T>
void launch_mma(const T* X, const std::int32_t* d_offsets, int E, int total_rows, const T* W, int N, int K, T* Y,
                cudaStream_t s) {
  if (!aligned(X, 16) || !aligned(W, 16) || !aligned(Y, 4) || K % 8 != 0 || N % 2 != 0)
    throw Error("grouped_linear", "needs K % 8 == 0, N even, X and W 16-byte aligned, Y 4-byte aligned");
  const std::size_t smem = kMmPipeBytes + 2 * (static_cast<std::size_t>(E) + 1) * sizeof(int);
  static bool attr[64] = {};
  if (bool& done = attr[device_info().id & 63]; !done) {
    FPF_CUDA(cudaFuncSetAttribute(k_gg_mma<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, device_info().smem_optin));
    done = true;
  }
  if (smem > static_cast<std::size_t>(device_info().smem_optin)) throw Error("grouped_linear", "too many experts");
  const long long tiles = max_m_tiles(E, total_rows, kMmBM) * ((N + kMmBN - 1) / kMmBN);
  if (tiles > 0x7fffffffLL) throw Error("grouped_linear", "too many tiles");
  const bool vec_store = N % 8 == 0 && aligned(Y, 16);
  k_gg_mma<T><<<static_cast<unsigned>(tiles), kMmThreads, smem, s>>>(X, d_offsets, E, W, N, K, Y, vec_store);
  FPF_CUDA_LAUNCH("k_gg_mma");
}

}  // namespace gg_detail

// Y[r, :] = X[r, :] W[e(r)]^T for every row r, e(r) the expert whose range [offsets[e], offsets[e + 1]) holds r.
// d_offsets: E + 1 ascending row offsets on the device (offsets[E] = total_rows). One launch; no synchronisation.
template <class T>
void grouped_linear(const T* X, const std::int32_t* d_offsets, int E, int total_rows, const T* W, int N, int K, T* Y,
                    cudaStream_t s = 0) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, fp16>, "grouped_linear: bf16 or fp16");
  if (total_rows <= 0 || N <= 0 || E <= 0) return;
  if (K <= 0) throw Error("grouped_linear", "K must be positive");
  if (gg_detail::can_wgmma<T>(X, W, Y, N, K, E)) return gg_detail::launch_wgmma<T>(X, d_offsets, E, total_rows, W, N, K, Y, s);
  gg_detail::launch_mma<T>(X, d_offsets, E, total_rows, W, N, K, Y, s);
}

}  // namespace fpf::cuda
