// Plain CUDA launchers for the ACE-HGNN hyperedge-attention kernels.
//
// No torch headers here: the launchers take raw pointers, sizes, element strides and a
// cudaStream_t, so the .cu files compile in about a second. csrc/bindings.cpp wraps them as
// torch ops (TORCH_LIBRARY namespace ace_kernels).
//
// Conventions shared by every launcher:
//   * features (pn, src, a, bsrc) are float32, float16 or bfloat16 (``Feat``), read in their own
//     dtype and converted to float32 in registers; weights and outputs are float32, indices int64;
//     strides are in elements;
//   * a column index of -1 marks an empty incidence slot (skipped, weight ignored);
//   * accumulation is in float32 and no launcher uses float atomics (deterministic).
// Each returns cudaGetLastError() after the launch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace ace_hg {

// Largest top-k the incidence kernel keeps per row.
constexpr int kMaxTopk = 16;
// Largest batch B any launcher takes (the grid's y dimension).
constexpr int64_t kMaxBatch = 65535;
// Largest number of incidence slots per row gather_sum takes (held in shared memory).
constexpr int kMaxSlots = 64;

// Shared memory per block, in bytes, topk_incidence needs at feature width D (its dynamic
// buffer and its static arrays). Beyond 48 KiB a launch needs the device's opt-in limit
// (cudaDevAttrMaxSharedMemoryPerBlockOptin) to cover it.
size_t topk_incidence_shared_bytes(int64_t D);

// Element type of a feature tensor.
enum class Feat : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Top-k cosine neighbours of R query patches among the M patches of each sample.
//   pn    [B, M, D] raw patch features (strides pn_sb, pn_sm, pn_sd)
//   inv_norm [B, M] 1 / max(|patch|, eps) (strides in_sb, in_sm): cosine = dot * inv_norm_q * inv_norm_m
//   rows  [B, R] patch index of each query (strides rows_sb, rows_sr), or nullptr: query r is patch r;
//         the values must lie in [0, M) (the caller's contract: they are not checked)
//   idx   [B, R, topk] int64 out (contiguous): selected patch indices, own patch excluded
//   w     [B, R, topk] float out (contiguous): softmax of the selected similarities
// Ties keep the lowest index; NaN similarities rank above every number (as torch.topk).
cudaError_t topk_incidence(const void* pn, Feat pn_type, int64_t pn_sb, int64_t pn_sm, int64_t pn_sd,
                           const float* inv_norm, int64_t in_sb, int64_t in_sm,
                           const int64_t* rows, int64_t rows_sb, int64_t rows_sr,
                           int64_t* idx, float* w, int64_t B, int64_t M, int64_t D, int64_t R, int topk,
                           cudaStream_t stream);

// out[b, q, :] = sum_s w[b, q, s] * src[b, cols[b, q, s], :]   (E = A X)
//   src [B, Rs, D] (strides), cols/w [B, Q, S] (strides), out [B, Q, D] contiguous
cudaError_t gather_sum(const void* src, Feat src_type, int64_t src_sb, int64_t src_sr, int64_t src_sd,
                       const int64_t* cols, int64_t cols_sb, int64_t cols_sq, int64_t cols_ss,
                       const float* w, int64_t w_sb, int64_t w_sq, int64_t w_ss,
                       float* out, int64_t B, int64_t Q, int64_t S, int64_t D, cudaStream_t stream);

// out[b, j, :] = sum over entries e in [row_ptr[b, j], row_ptr[b, j + 1]) of
//                w_flat[b, perm[b, e]] * src[b, perm[b, e] / S, :]   (C = A^T E', transposed incidence)
//   src [B, Q, D] (strides), w_flat [B, Q * S] contiguous rows (stride w_sb),
//   row_ptr [B, R + 1] and perm [B, nnz] contiguous rows (strides rp_sb, perm_sb), out [B, R, D] contiguous
cudaError_t scatter_sum_csr(const void* src, Feat src_type, int64_t src_sb, int64_t src_sq, int64_t src_sd,
                            const float* w_flat, int64_t w_sb, const int64_t* row_ptr, int64_t rp_sb,
                            const int64_t* perm, int64_t perm_sb, float* out, int64_t B, int64_t R, int64_t S,
                            int64_t D, cudaStream_t stream);

// out[b, q, s] = <a[b, q, :], bsrc[b, cols[b, q, s], :]> (0 for empty slots); out [B, Q, S] contiguous
cudaError_t entry_dot(const void* a, Feat a_type, int64_t a_sb, int64_t a_sq, int64_t a_sd,
                      const void* bsrc, Feat b_type, int64_t b_sb, int64_t b_sr, int64_t b_sd,
                      const int64_t* cols, int64_t cols_sb, int64_t cols_sq, int64_t cols_ss,
                      float* out, int64_t B, int64_t Q, int64_t S, int64_t D, cudaStream_t stream);

}  // namespace ace_hg
