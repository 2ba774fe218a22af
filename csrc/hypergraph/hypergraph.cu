// CUDA kernels for ACE-HGNN hyperedge attention: top-k incidence and the two aggregations.
// See hypergraph.h for the contracts. No torch headers (fast nvcc builds).
#include "hypergraph/hypergraph.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace ace_hg {
namespace {

// Features are read in their own dtype and converted in registers (float32 accumulation).
// Half types are loaded as their 16 raw bits (passing the __half / __nv_bfloat16 structs by
// value made ptxas spill in entry_dot_kernel).
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __half* p) {
  return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) {
  // bfloat16 is the top half of a float32: widening is exact.
  return __uint_as_float(static_cast<unsigned>(*reinterpret_cast<const unsigned short*>(p)) << 16);
}

constexpr int kTopkThreads = 256;
constexpr int kQueriesPerBlock = kTopkThreads / 32;  // one warp merges each query's top-k
constexpr int kTopkChunk = 512;  // similarities per query held in shared memory per pass
constexpr int kRowThreads = 128;
// The top-k kernel's static __shared__ arrays (top_v, top_i, own_row below) and the 48 KiB every
// kernel may use without opting in: a launch within it needs no attribute query.
constexpr size_t kTopkStaticShared = kQueriesPerBlock * kMaxTopk * (sizeof(float) + sizeof(int64_t)) +
                                     kQueriesPerBlock * sizeof(int64_t);
constexpr size_t kDefaultShared = 48 * 1024;

struct Candidate {
  float value;
  int64_t index;  // global patch index (ties: lowest wins)
  int pos;        // where it sits in the candidate buffer
};

__device__ __forceinline__ bool better(float v, int64_t i, float bv, int64_t bi) {
  // NaN marks a taken or empty entry: every comparison with it is false.
  return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    float v = __shfl_down_sync(0xffffffffu, c.value, offset);
    long long i = __shfl_down_sync(0xffffffffu, static_cast<long long>(c.index), offset);
    int p = __shfl_down_sync(0xffffffffu, c.pos, offset);
    if (better(v, i, c.value, c.index)) {
      c.value = v;
      c.index = i;
      c.pos = p;
    }
  }
  return c;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One block per (kQueriesPerBlock consecutive queries, sample); warp w owns query w.
// Phase 1 (per chunk of candidates): each warp takes candidate rows, each lane reads the row's
// elements once and multiplies them against every query of the block held in shared memory.
// Phase 2: warp w merges its query's chunk into its running top-k (topk rounds of a warp
// argmax; no block barriers). Similarities never leave shared memory.
template <typename T>
__global__ void __launch_bounds__(kTopkThreads)
topk_incidence_kernel(const T* __restrict__ pn, int64_t pn_sb, int64_t pn_sm, int64_t pn_sd,
                      const float* __restrict__ inv_norm, int64_t in_sb, int64_t in_sm,
                      const int64_t* __restrict__ rows, int64_t rows_sb, int64_t rows_sr,
                      int64_t* __restrict__ idx_out, float* __restrict__ w_out,
                      int64_t M, int64_t D, int64_t R, int topk) {
  extern __shared__ float smem[];
  float* queries = smem;                              // [kQueriesPerBlock][D]
  float* sims = queries + kQueriesPerBlock * D;       // [kQueriesPerBlock][kTopkChunk]
  __shared__ float top_v[kQueriesPerBlock][kMaxTopk];
  __shared__ int64_t top_i[kQueriesPerBlock][kMaxTopk];
  __shared__ int64_t own_row[kQueriesPerBlock];
  static_assert(sizeof(top_v) + sizeof(top_i) + sizeof(own_row) == kTopkStaticShared,
                "kTopkStaticShared must count this kernel's static shared arrays");

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kQueriesPerBlock;
  const int64_t b = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nq = static_cast<int>((R - r0 < kQueriesPerBlock) ? (R - r0) : kQueriesPerBlock);
  const T* pn_b = pn + b * pn_sb;

  if (tid < kQueriesPerBlock) {
    const int64_t r = r0 + tid;
    own_row[tid] = tid < nq ? (rows ? rows[b * rows_sb + r * rows_sr] : r) : -1;
  }
  if (tid < kQueriesPerBlock * kMaxTopk) {
    top_v[tid / kMaxTopk][tid % kMaxTopk] = NAN;  // empty
    top_i[tid / kMaxTopk][tid % kMaxTopk] = 0;
  }
  __syncthreads();
  for (int64_t e = tid; e < kQueriesPerBlock * D; e += blockDim.x) {
    const int qi = static_cast<int>(e / D);
    const int64_t d = e - qi * D;
    // Queries are stored normalised; candidates are scaled after their dot product.
    queries[e] = qi < nq ? load_f32(pn_b + own_row[qi] * pn_sm + d * pn_sd) * inv_norm[b * in_sb + own_row[qi] * in_sm]
                         : 0.f;
  }
  __syncthreads();

  for (int64_t c0 = 0; c0 < M; c0 += kTopkChunk) {
    const int64_t count = (M - c0 < kTopkChunk) ? (M - c0) : kTopkChunk;
    for (int64_t j = warp; j < count; j += kTopkThreads / 32) {
      const int64_t m = c0 + j;
      const T* row = pn_b + m * pn_sm;
      const float inv_m = inv_norm[b * in_sb + m * in_sm];
      float acc[kQueriesPerBlock];
#pragma unroll
      for (int qi = 0; qi < kQueriesPerBlock; ++qi) acc[qi] = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        const float v = load_f32(row + d * pn_sd);
#pragma unroll
        for (int qi = 0; qi < kQueriesPerBlock; ++qi) acc[qi] = fmaf(queries[qi * D + d], v, acc[qi]);
      }
#pragma unroll
      for (int qi = 0; qi < kQueriesPerBlock; ++qi) {
        const float dot = warp_sum(acc[qi]) * inv_m;
        if (lane == 0) {
          const float key = isnan(dot) ? INFINITY : dot;  // NaN ranks first, as in torch.topk
          sims[qi * kTopkChunk + j] = (m == own_row[qi]) ? -INFINITY : key;
        }
      }
    }
    __syncthreads();
    if (warp < nq) {
      float* my_sims = sims + warp * kTopkChunk;
      float* my_v = top_v[warp];
      int64_t* my_i = top_i[warp];
      float new_v = -INFINITY;  // lane t < topk keeps the t-th pick of this merge
      int64_t new_i = 0;
      for (int t = 0; t < topk; ++t) {
        // Empty: loses to every real candidate, -inf included (torch.topk also returns -inf
        // entries when a row has fewer than topk finite scores). NaN marks taken entries.
        Candidate best{-INFINITY, INT64_MAX, -1};
        for (int64_t j = lane; j < count + topk; j += 32) {
          const float v = j < count ? my_sims[j] : my_v[j - count];
          const int64_t gi = j < count ? c0 + j : my_i[j - count];
          if (better(v, gi, best.value, best.index)) best = Candidate{v, gi, static_cast<int>(j)};
        }
        best = warp_best(best);
        const float win_v = __shfl_sync(0xffffffffu, best.value, 0);
        const long long win_i = __shfl_sync(0xffffffffu, static_cast<long long>(best.index), 0);
        const int win_pos = __shfl_sync(0xffffffffu, best.pos, 0);
        if (lane == t) {
          new_v = win_pos >= 0 ? win_v : -INFINITY;
          new_i = win_pos >= 0 ? win_i : 0;
        }
        if (lane == 0 && win_pos >= 0) {
          if (win_pos < count) my_sims[win_pos] = NAN; else my_v[win_pos - count] = NAN;
        }
        __syncwarp();
      }
      if (lane < topk) {
        my_v[lane] = new_v;
        my_i[lane] = new_i;
      }
      __syncwarp();
    }
    __syncthreads();
  }

  if (warp < nq && lane < topk) {
    // Picks are in descending order: slot 0 holds the max.
    const float vmax = top_v[warp][0];
    const float e = expf(top_v[warp][lane] - vmax);
    float total = 0.f;
    for (int t = 0; t < topk; ++t) total += expf(top_v[warp][t] - vmax);
    const int64_t base = (b * R + r0 + warp) * topk;
    idx_out[base + lane] = top_i[warp][lane];
    w_out[base + lane] = e / total;
  }
}

// One block per output row; threads along D. Slots in shared memory.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
gather_sum_kernel(const T* __restrict__ src, int64_t src_sb, int64_t src_sr, int64_t src_sd,
                  const int64_t* __restrict__ cols, int64_t cols_sb, int64_t cols_sq, int64_t cols_ss,
                  const float* __restrict__ w, int64_t w_sb, int64_t w_sq, int64_t w_ss,
                  float* __restrict__ out, int64_t Q, int64_t S, int64_t D) {
  __shared__ int64_t slot_col[kMaxSlots];
  __shared__ float slot_w[kMaxSlots];
  const int64_t q = blockIdx.x;
  const int64_t b = blockIdx.y;
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    slot_col[s] = cols[b * cols_sb + q * cols_sq + s * cols_ss];
    slot_w[s] = w[b * w_sb + q * w_sq + s * w_ss];
  }
  __syncthreads();
  const T* src_b = src + b * src_sb;
  float* out_row = out + (b * Q + q) * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t col = slot_col[s];
      if (col >= 0) acc = fmaf(slot_w[s], load_f32(src_b + col * src_sr + d * src_sd), acc);
    }
    out_row[d] = acc;
  }
}

// One block per output (target) row, walking its segment of the transposed incidence in a
// fixed order: deterministic, no atomics.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
scatter_sum_csr_kernel(const T* __restrict__ src, int64_t src_sb, int64_t src_sq, int64_t src_sd,
                       const float* __restrict__ w_flat, int64_t w_sb, const int64_t* __restrict__ row_ptr,
                       int64_t rp_sb, const int64_t* __restrict__ perm, int64_t perm_sb,
                       float* __restrict__ out, int64_t R, int64_t S, int64_t D) {
  const int64_t j = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t start = row_ptr[b * rp_sb + j];
  const int64_t stop = row_ptr[b * rp_sb + j + 1];
  const T* src_b = src + b * src_sb;
  float* out_row = out + (b * R + j) * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t e = start; e < stop; ++e) {
      const int64_t entry = perm[b * perm_sb + e];
      acc = fmaf(w_flat[b * w_sb + entry], load_f32(src_b + (entry / S) * src_sq + d * src_sd), acc);
    }
    out_row[d] = acc;
  }
}

// One block per row q; one warp per slot s (strided), lanes along D.
template <typename TA, typename TB>
__global__ void __launch_bounds__(kRowThreads)
entry_dot_kernel(const TA* __restrict__ a, int64_t a_sb, int64_t a_sq, int64_t a_sd,
                 const TB* __restrict__ bsrc, int64_t b_sb, int64_t b_sr, int64_t b_sd,
                 const int64_t* __restrict__ cols, int64_t cols_sb, int64_t cols_sq, int64_t cols_ss,
                 float* __restrict__ out, int64_t Q, int64_t S, int64_t D) {
  const int64_t q = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const TA* a_row = a + b * a_sb + q * a_sq;
  for (int64_t s = warp; s < S; s += nwarps) {
    const int64_t col = cols[b * cols_sb + q * cols_sq + s * cols_ss];
    float acc = 0.f;
    if (col >= 0) {
      const TB* b_row = bsrc + b * b_sb + col * b_sr;
      // An explicit unroll factor: the default unrolling spilled 4 bytes for half a (ptxas, sm_90a).
#pragma unroll 4
      for (int64_t d = lane; d < D; d += 32) acc = fmaf(load_f32(a_row + d * a_sd), load_f32(b_row + d * b_sd), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[(b * Q + q) * S + s] = acc;
  }
}

bool grid_ok(int64_t rows, int64_t batch) { return rows <= 0x7fffffffLL && batch <= kMaxBatch; }

// Calls f(T{}) with T the C++ type of a feature dtype; cudaErrorInvalidValue for an unknown one.
template <typename F>
cudaError_t with_feat(Feat type, F&& f) {
  switch (type) {
    case Feat::kF32: return f(float{});
    case Feat::kF16: return f(__half{});
    case Feat::kBF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t topk_incidence_shared_bytes(int64_t D) {
  return static_cast<size_t>(kQueriesPerBlock) * (D + kTopkChunk) * sizeof(float) + kTopkStaticShared;
}

cudaError_t topk_incidence(const void* pn, Feat pn_type, int64_t pn_sb, int64_t pn_sm, int64_t pn_sd,
                           const float* inv_norm, int64_t in_sb, int64_t in_sm, const int64_t* rows, int64_t rows_sb,
                           int64_t rows_sr, int64_t* idx, float* w, int64_t B, int64_t M, int64_t D, int64_t R,
                           int topk, cudaStream_t stream) {
  if (topk < 1 || topk > kMaxTopk || topk > M || !grid_ok(R, B)) return cudaErrorInvalidValue;
  if (B == 0 || R == 0) return cudaSuccess;
  const size_t shared = topk_incidence_shared_bytes(D) - kTopkStaticShared;  // the dynamic buffer
  const int64_t blocks = (R + kQueriesPerBlock - 1) / kQueriesPerBlock;
  return with_feat(pn_type, [&](auto tag) {
    using T = decltype(tag);
    // The kernel's own __shared__ arrays count against the same limit as the dynamic buffer.
    // Within the 48 KiB any kernel may use (D up to 974) nothing is queried. Beyond it, compare with
    // what the kernel allows now and, when more is needed, raise the kernel's cap to all the device
    // allows beside its static arrays: every call sets that same value, so host threads launching
    // at different D cannot lower it under one another.
    if (shared + kTopkStaticShared > kDefaultShared) {
      cudaFuncAttributes attr;
      cudaError_t err = cudaFuncGetAttributes(&attr, topk_incidence_kernel<T>);
      if (err != cudaSuccess) return err;
      if (shared > static_cast<size_t>(attr.maxDynamicSharedSizeBytes)) {
        int device = 0;
        int optin = 0;
        err = cudaGetDevice(&device);
        if (err != cudaSuccess) return err;
        err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        if (err != cudaSuccess) return err;
        const size_t room = static_cast<size_t>(optin) - attr.sharedSizeBytes;
        if (shared > room) return cudaErrorInvalidValue;
        err = cudaFuncSetAttribute(topk_incidence_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(room));
        if (err != cudaSuccess) return err;
      }
    }
    topk_incidence_kernel<T><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(B)), kTopkThreads, shared,
                               stream>>>(static_cast<const T*>(pn), pn_sb, pn_sm, pn_sd, inv_norm, in_sb, in_sm, rows,
                                         rows_sb, rows_sr, idx, w, M, D, R, topk);
    return cudaGetLastError();
  });
}

cudaError_t gather_sum(const void* src, Feat src_type, int64_t src_sb, int64_t src_sr, int64_t src_sd,
                       const int64_t* cols, int64_t cols_sb, int64_t cols_sq, int64_t cols_ss, const float* w,
                       int64_t w_sb, int64_t w_sq, int64_t w_ss, float* out, int64_t B, int64_t Q, int64_t S,
                       int64_t D, cudaStream_t stream) {
  if (S > kMaxSlots || !grid_ok(Q, B)) return cudaErrorInvalidValue;
  if (B == 0 || Q == 0) return cudaSuccess;
  return with_feat(src_type, [&](auto tag) {
    using T = decltype(tag);
    gather_sum_kernel<T><<<dim3(static_cast<unsigned>(Q), static_cast<unsigned>(B)), kRowThreads, 0, stream>>>(
        static_cast<const T*>(src), src_sb, src_sr, src_sd, cols, cols_sb, cols_sq, cols_ss, w, w_sb, w_sq, w_ss,
        out, Q, S, D);
    return cudaGetLastError();
  });
}

cudaError_t scatter_sum_csr(const void* src, Feat src_type, int64_t src_sb, int64_t src_sq, int64_t src_sd,
                            const float* w_flat, int64_t w_sb, const int64_t* row_ptr, int64_t rp_sb,
                            const int64_t* perm, int64_t perm_sb, float* out, int64_t B, int64_t R, int64_t S,
                            int64_t D, cudaStream_t stream) {
  if (S < 1 || !grid_ok(R, B)) return cudaErrorInvalidValue;
  if (B == 0 || R == 0) return cudaSuccess;
  return with_feat(src_type, [&](auto tag) {
    using T = decltype(tag);
    scatter_sum_csr_kernel<T><<<dim3(static_cast<unsigned>(R), static_cast<unsigned>(B)), kRowThreads, 0, stream>>>(
        static_cast<const T*>(src), src_sb, src_sq, src_sd, w_flat, w_sb, row_ptr, rp_sb, perm, perm_sb, out, R, S,
        D);
    return cudaGetLastError();
  });
}

cudaError_t entry_dot(const void* a, Feat a_type, int64_t a_sb, int64_t a_sq, int64_t a_sd, const void* bsrc,
                      Feat b_type, int64_t b_sb, int64_t b_sr, int64_t b_sd, const int64_t* cols, int64_t cols_sb,
                      int64_t cols_sq, int64_t cols_ss, float* out, int64_t B, int64_t Q, int64_t S, int64_t D,
                      cudaStream_t stream) {
  if (!grid_ok(Q, B)) return cudaErrorInvalidValue;
  if (B == 0 || Q == 0 || S == 0) return cudaSuccess;
  return with_feat(a_type, [&](auto a_tag) {
    return with_feat(b_type, [&](auto b_tag) {
      using TA = decltype(a_tag);
      using TB = decltype(b_tag);
      entry_dot_kernel<TA, TB><<<dim3(static_cast<unsigned>(Q), static_cast<unsigned>(B)), kRowThreads, 0,
                                 stream>>>(static_cast<const TA*>(a), a_sb, a_sq, a_sd, static_cast<const TB*>(bsrc),
                                           b_sb, b_sr, b_sd, cols, cols_sb, cols_sq, cols_ss, out, Q, S, D);
      return cudaGetLastError();
    });
  });
}

}  // namespace ace_hg
