// CUDA kernels for ACE-HGNN hyperedge attention: top-k incidence and the two aggregations.
// See hypergraph.h for the contracts. No torch headers (fast nvcc builds).
#include "hypergraph/hypergraph.h"

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace ace_hg {
namespace {

constexpr int kTopkThreads = 256;
constexpr int kTopkChunk = 1024;  // similarities held in shared memory per pass over the patches
constexpr int kRowThreads = 128;
constexpr int kMaxSlots = 64;     // incidence slots per row held in shared memory

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

// One block per (query, sample). Shared: the query row, a chunk of similarities, the running
// top-k (values + indices) and the per-warp partial winners.
__global__ void __launch_bounds__(kTopkThreads)
topk_incidence_kernel(const float* __restrict__ pn, int64_t pn_sb, int64_t pn_sm, int64_t pn_sd,
                      const int64_t* __restrict__ rows, int64_t rows_sb, int64_t rows_sr,
                      int64_t* __restrict__ idx_out, float* __restrict__ w_out,
                      int64_t M, int64_t D, int64_t R, int topk) {
  extern __shared__ float smem[];
  float* query = smem;                  // [D]
  float* sims = query + D;              // [kTopkChunk]
  __shared__ float top_v[kMaxTopk], new_v[kMaxTopk];
  __shared__ int64_t top_i[kMaxTopk], new_i[kMaxTopk];
  __shared__ Candidate warp_win[kTopkThreads / 32];

  const int64_t r = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  const int64_t own = rows ? rows[b * rows_sb + r * rows_sr] : r;
  const float* pn_b = pn + b * pn_sb;

  for (int64_t d = tid; d < D; d += blockDim.x) query[d] = pn_b[own * pn_sm + d * pn_sd];
  if (tid < kMaxTopk) {
    top_v[tid] = NAN;  // empty
    top_i[tid] = 0;
  }
  __syncthreads();

  for (int64_t c0 = 0; c0 < M; c0 += kTopkChunk) {
    const int64_t count = (M - c0 < kTopkChunk) ? (M - c0) : kTopkChunk;
    // Similarities of this chunk: one warp per candidate row, lanes along D.
    for (int64_t j = warp; j < count; j += nwarps) {
      const int64_t m = c0 + j;
      const float* row = pn_b + m * pn_sm;
      float acc = 0.f;
      for (int64_t d = lane; d < D; d += 32) acc = fmaf(query[d], row[d * pn_sd], acc);
      acc = warp_sum(acc);
      if (lane == 0) {
        float key = isnan(acc) ? INFINITY : acc;  // NaN ranks first, as in torch.topk
        sims[j] = (m == own) ? -INFINITY : key;
      }
    }
    __syncthreads();
    // Merge: topk rounds of a block-wide argmax over the chunk and the running list.
    for (int t = 0; t < topk; ++t) {
      // Empty: loses to every real candidate, -inf included (torch.topk also returns -inf
      // entries when a row has fewer than topk finite scores).
      Candidate best{-INFINITY, INT64_MAX, -1};
      for (int64_t j = tid; j < count + topk; j += blockDim.x) {
        float v;
        int64_t gi;
        if (j < count) {
          v = sims[j];
          gi = c0 + j;
        } else {
          v = top_v[j - count];
          gi = top_i[j - count];
        }
        if (better(v, gi, best.value, best.index)) {
          best.value = v;
          best.index = gi;
          best.pos = static_cast<int>(j);
        }
      }
      best = warp_best(best);
      if (lane == 0) warp_win[warp] = best;
      __syncthreads();
      if (tid == 0) {
        Candidate win = warp_win[0];
        for (int w = 1; w < nwarps; ++w) {
          const Candidate c = warp_win[w];
          if (better(c.value, c.index, win.value, win.index)) win = c;
        }
        if (win.pos >= 0) {
          new_v[t] = win.value;
          new_i[t] = win.index;
          if (win.pos < count) sims[win.pos] = NAN; else top_v[win.pos - count] = NAN;
        } else {
          new_v[t] = -INFINITY;
          new_i[t] = 0;
        }
      }
      __syncthreads();
    }
    if (tid < topk) {
      top_v[tid] = new_v[tid];
      top_i[tid] = new_i[tid];
    }
    __syncthreads();
  }

  if (tid == 0) {
    // The list is sorted descending: top_v[0] is the max.
    const float vmax = top_v[0];
    float total = 0.f;
    for (int t = 0; t < topk; ++t) total += expf(top_v[t] - vmax);
    const int64_t base = (b * R + r) * topk;
    for (int t = 0; t < topk; ++t) {
      idx_out[base + t] = top_i[t];
      w_out[base + t] = expf(top_v[t] - vmax) / total;
    }
  }
}

// One block per output row; threads along D. Slots in shared memory.
__global__ void __launch_bounds__(kRowThreads)
gather_sum_kernel(const float* __restrict__ src, int64_t src_sb, int64_t src_sr, int64_t src_sd,
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
  const float* src_b = src + b * src_sb;
  float* out_row = out + (b * Q + q) * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t col = slot_col[s];
      if (col >= 0) acc = fmaf(slot_w[s], src_b[col * src_sr + d * src_sd], acc);
    }
    out_row[d] = acc;
  }
}

// One block per output (target) row, walking its segment of the transposed incidence in a
// fixed order: deterministic, no atomics.
__global__ void __launch_bounds__(kRowThreads)
scatter_sum_csr_kernel(const float* __restrict__ src, int64_t src_sb, int64_t src_sq, int64_t src_sd,
                       const float* __restrict__ w_flat, int64_t w_sb, const int64_t* __restrict__ row_ptr,
                       int64_t rp_sb, const int64_t* __restrict__ perm, int64_t perm_sb,
                       float* __restrict__ out, int64_t R, int64_t S, int64_t D) {
  const int64_t j = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t start = row_ptr[b * rp_sb + j];
  const int64_t stop = row_ptr[b * rp_sb + j + 1];
  const float* src_b = src + b * src_sb;
  float* out_row = out + (b * R + j) * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t e = start; e < stop; ++e) {
      const int64_t entry = perm[b * perm_sb + e];
      acc = fmaf(w_flat[b * w_sb + entry], src_b[(entry / S) * src_sq + d * src_sd], acc);
    }
    out_row[d] = acc;
  }
}

// One block per row q; one warp per slot s (strided), lanes along D.
__global__ void __launch_bounds__(kRowThreads)
entry_dot_kernel(const float* __restrict__ a, int64_t a_sb, int64_t a_sq, int64_t a_sd,
                 const float* __restrict__ bsrc, int64_t b_sb, int64_t b_sr, int64_t b_sd,
                 const int64_t* __restrict__ cols, int64_t cols_sb, int64_t cols_sq, int64_t cols_ss,
                 float* __restrict__ out, int64_t Q, int64_t S, int64_t D) {
  const int64_t q = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const float* a_row = a + b * a_sb + q * a_sq;
  for (int64_t s = warp; s < S; s += nwarps) {
    const int64_t col = cols[b * cols_sb + q * cols_sq + s * cols_ss];
    float acc = 0.f;
    if (col >= 0) {
      const float* b_row = bsrc + b * b_sb + col * b_sr;
      for (int64_t d = lane; d < D; d += 32) acc = fmaf(a_row[d * a_sd], b_row[d * b_sd], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[(b * Q + q) * S + s] = acc;
  }
}

bool grid_ok(int64_t rows, int64_t batch) { return rows <= 0x7fffffffLL && batch <= 65535; }

}  // namespace

cudaError_t topk_incidence(const float* pn, int64_t pn_sb, int64_t pn_sm, int64_t pn_sd, const int64_t* rows,
                           int64_t rows_sb, int64_t rows_sr, int64_t* idx, float* w, int64_t B, int64_t M,
                           int64_t D, int64_t R, int topk, cudaStream_t stream) {
  if (topk < 1 || topk > kMaxTopk || topk > M || !grid_ok(R, B)) return cudaErrorInvalidValue;
  if (B == 0 || R == 0) return cudaSuccess;
  const size_t shared = static_cast<size_t>(D + kTopkChunk) * sizeof(float);
  if (shared > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(topk_incidence_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  topk_incidence_kernel<<<dim3(static_cast<unsigned>(R), static_cast<unsigned>(B)), kTopkThreads, shared, stream>>>(
      pn, pn_sb, pn_sm, pn_sd, rows, rows_sb, rows_sr, idx, w, M, D, R, topk);
  return cudaGetLastError();
}

cudaError_t gather_sum(const float* src, int64_t src_sb, int64_t src_sr, int64_t src_sd, const int64_t* cols,
                       int64_t cols_sb, int64_t cols_sq, int64_t cols_ss, const float* w, int64_t w_sb,
                       int64_t w_sq, int64_t w_ss, float* out, int64_t B, int64_t Q, int64_t S, int64_t D,
                       cudaStream_t stream) {
  if (S > kMaxSlots || !grid_ok(Q, B)) return cudaErrorInvalidValue;
  if (B == 0 || Q == 0) return cudaSuccess;
  gather_sum_kernel<<<dim3(static_cast<unsigned>(Q), static_cast<unsigned>(B)), kRowThreads, 0, stream>>>(
      src, src_sb, src_sr, src_sd, cols, cols_sb, cols_sq, cols_ss, w, w_sb, w_sq, w_ss, out, Q, S, D);
  return cudaGetLastError();
}

cudaError_t scatter_sum_csr(const float* src, int64_t src_sb, int64_t src_sq, int64_t src_sd, const float* w_flat,
                            int64_t w_sb, const int64_t* row_ptr, int64_t rp_sb, const int64_t* perm,
                            int64_t perm_sb, float* out, int64_t B, int64_t R, int64_t S, int64_t D,
                            cudaStream_t stream) {
  if (S < 1 || !grid_ok(R, B)) return cudaErrorInvalidValue;
  if (B == 0 || R == 0) return cudaSuccess;
  scatter_sum_csr_kernel<<<dim3(static_cast<unsigned>(R), static_cast<unsigned>(B)), kRowThreads, 0, stream>>>(
      src, src_sb, src_sq, src_sd, w_flat, w_sb, row_ptr, rp_sb, perm, perm_sb, out, R, S, D);
  return cudaGetLastError();
}

cudaError_t entry_dot(const float* a, int64_t a_sb, int64_t a_sq, int64_t a_sd, const float* bsrc, int64_t b_sb,
                      int64_t b_sr, int64_t b_sd, const int64_t* cols, int64_t cols_sb, int64_t cols_sq,
                      int64_t cols_ss, float* out, int64_t B, int64_t Q, int64_t S, int64_t D,
                      cudaStream_t stream) {
  if (!grid_ok(Q, B)) return cudaErrorInvalidValue;
  if (B == 0 || Q == 0 || S == 0) return cudaSuccess;
  entry_dot_kernel<<<dim3(static_cast<unsigned>(Q), static_cast<unsigned>(B)), kRowThreads, 0, stream>>>(
      a, a_sb, a_sq, a_sd, bsrc, b_sb, b_sr, b_sd, cols, cols_sb, cols_sq, cols_ss, out, Q, S, D);
  return cudaGetLastError();
}

}  // namespace ace_hg
