// Torch bindings of the ace-kernels CUDA launchers: ops in the `ace_kernels` namespace
// (torch.ops.ace_kernels.*), registered with TORCH_LIBRARY so they compose with
// torch.compile. Importing the Python module ace_kernels._C loads this library and runs the
// registrations; the module itself has no functions.
//
// Only this file includes torch headers; the kernels live in plain .cu files (csrc/<family>/).
#include <Python.h>

#if __cplusplus < 202002L
// torch >= 2.10 headers need C++20. Compiled as C++17 (an explicit -std=c++17 in setup.py's
// cxx flags), this file only builds the bare module, so the install still succeeds; the
// ops are then missing and ace_kernels reports the cuda backend as unavailable with the reason.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "ace-kernels CUDA ops: NOT registered (built as C++17; torch needs C++20)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
#else

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hypergraph/hypergraph.h"

namespace {

void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "argument '", name, "': expected a ", dim, "-D tensor, got ", t.dim(), "-D");
}

// Dtypes are checked by each op's shape checks, shared with its meta kernel, so that fake tensors
// meet the device's refusals; the device by the CUDA versions below (check_cuda, check_feat).
void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "argument '", name, "': expected ", dtype, ", got ", t.scalar_type());
}

// A feature tensor (read by the kernels in its own dtype): float32, float16 or bfloat16.
ace_hg::Feat feat_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ace_hg::Feat::kF32;
    case at::kHalf: return ace_hg::Feat::kF16;
    case at::kBFloat16: return ace_hg::Feat::kBF16;
    default:
      TORCH_CHECK(false, "argument '", name, "': expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "argument '", name, "': expected a CUDA tensor, got ", t.device());
}

// A feature tensor on the GPU, and the dtype the kernels read it in (the shape checks check it too).
ace_hg::Feat check_feat(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  return feat_type(t, name);
}

// `t` on the device of `ref` (the kernels read both through one device's address space).
void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "argument '", name, "': expected a tensor on ", ref.device(),
              " (the device of '", ref_name, "'), got ", t.device());
}

// t.size(dim) == expected; `what` names the quantity (e.g. "B = src.size(0)").
void check_size(const at::Tensor& t, const char* name, int64_t dim, const c10::SymInt& expected,
                const char* what) {
  TORCH_CHECK(t.sym_size(dim) == expected, "argument '", name, "': expected size ", expected, " (", what, ") at dim ",
              dim, ", got shape ", t.sym_sizes());
}

void check_batch(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sym_size(0) <= ace_hg::kMaxBatch, "argument '", name, "': expected a batch of at most ",
              ace_hg::kMaxBatch, " (size(0)), got shape ", t.sym_sizes());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ace_kernels::", what, " launch failed: ", cudaGetErrorString(err));
}

// ---------------------------------------------------------------------------------- hypergraph
//
// Each op's shape checks are shared by its CUDA kernel and its meta version, so that fake
// tensors (torch.compile, opcheck) meet the same refusals as the device. What the launchers
// would refuse is checked here first, naming the argument.

void check_topk_shapes(const at::Tensor& pn, const at::Tensor& inv_norm, const c10::optional<at::Tensor>& rows,
                       int64_t topk) {
  check_dim(pn, "pn", 3);
  check_dim(inv_norm, "inv_norm", 2);
  feat_type(pn, "pn");
  check_dtype(inv_norm, "inv_norm", at::kFloat);
  check_batch(pn, "pn");
  const c10::SymInt B = pn.sym_size(0), M = pn.sym_size(1);
  TORCH_CHECK(inv_norm.sym_size(0) == B && inv_norm.sym_size(1) == M, "argument 'inv_norm': expected shape [", B,
              ", ", M, "], got ", inv_norm.sym_sizes());
  if (rows.has_value()) {
    check_dim(*rows, "rows", 2);
    check_dtype(*rows, "rows", at::kLong);
    TORCH_CHECK(rows->sym_size(0) == B, "argument 'rows': expected ", B, " rows of indices, got ", rows->sym_size(0));
  }
  TORCH_CHECK(topk >= 1 && topk <= ace_hg::kMaxTopk && topk < M, "argument 'topk': expected 1 <= topk <= ",
              ace_hg::kMaxTopk, " and topk < M = ", M, ", got ", topk);
}

void check_gather_shapes(const at::Tensor& src, const at::Tensor& cols, const at::Tensor& weights) {
  check_dim(src, "src", 3);
  check_dim(cols, "cols", 3);
  feat_type(src, "src");
  check_dtype(cols, "cols", at::kLong);
  check_dtype(weights, "weights", at::kFloat);
  TORCH_CHECK(weights.sym_sizes() == cols.sym_sizes(), "argument 'weights': expected the shape of 'cols' ",
              cols.sym_sizes(), ", got ", weights.sym_sizes());
  check_size(cols, "cols", 0, src.sym_size(0), "B = src.size(0)");
  check_batch(src, "src");
  TORCH_CHECK(cols.sym_size(2) <= ace_hg::kMaxSlots, "argument 'cols': expected at most ", ace_hg::kMaxSlots,
              " slots per row (size(2)), got shape ", cols.sym_sizes());
}

// The kernel reads weights_flat[b, perm[b, j]] for j in row_ptr[b, r]..row_ptr[b, r + 1] and
// src[b, perm / slots]: the shapes must agree (the values are the caller's contract, see hypergraph.h).
void check_scatter_shapes(const at::Tensor& src, const at::Tensor& weights_flat, const at::Tensor& row_ptr,
                          const at::Tensor& perm, int64_t num_rows, int64_t slots) {
  check_dim(src, "src", 3);
  check_dim(weights_flat, "weights_flat", 2);
  check_dim(row_ptr, "row_ptr", 2);
  check_dim(perm, "perm", 2);
  feat_type(src, "src");
  check_dtype(weights_flat, "weights_flat", at::kFloat);
  check_dtype(row_ptr, "row_ptr", at::kLong);
  check_dtype(perm, "perm", at::kLong);
  check_batch(src, "src");
  TORCH_CHECK(slots >= 1, "argument 'slots': expected >= 1, got ", slots);
  TORCH_CHECK(num_rows >= 0, "argument 'num_rows': expected >= 0, got ", num_rows);
  TORCH_CHECK(row_ptr.sym_size(1) == num_rows + 1, "argument 'row_ptr': expected ", num_rows + 1, " columns, got ",
              row_ptr.sym_size(1));
  TORCH_CHECK(weights_flat.sym_size(1) == src.sym_size(1) * slots, "argument 'weights_flat': expected ",
              src.sym_size(1) * slots, " columns (src.size(1) * slots), got ", weights_flat.sym_size(1));
  TORCH_CHECK(perm.sym_size(1) == weights_flat.sym_size(1), "argument 'perm': expected ", weights_flat.sym_size(1),
              " columns (as weights_flat), got ", perm.sym_size(1));
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weights_flat, "weights_flat"},
                                {row_ptr, "row_ptr"}, {perm, "perm"}}) {
    check_size(t, name, 0, src.sym_size(0), "B = src.size(0)");
    // The kernel walks these rows with unit steps; the fake kernel refuses what the device one does.
    // A row of one element has no step (torch calls it contiguous whatever its stride).
    TORCH_CHECK(t.sym_size(1) <= 1 || t.sym_stride(1) == 1, "argument '", name,
                "': expected unit stride at dim 1, got ", t.sym_stride(1));
  }
}

void check_entry_dot_shapes(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cols) {
  check_dim(a, "a", 3);
  check_dim(b, "b", 3);
  check_dim(cols, "cols", 3);
  feat_type(a, "a");
  feat_type(b, "b");
  check_dtype(cols, "cols", at::kLong);
  check_batch(a, "a");
  check_size(b, "b", 0, a.sym_size(0), "B = a.size(0)");
  check_size(b, "b", 2, a.sym_size(2), "D = a.size(2)");
  check_size(cols, "cols", 0, a.sym_size(0), "B = a.size(0)");
  check_size(cols, "cols", 1, a.sym_size(1), "Q = a.size(1)");
}

std::tuple<at::Tensor, at::Tensor> hg_topk_incidence_cuda(const at::Tensor& pn, const at::Tensor& inv_norm,
                                                          const c10::optional<at::Tensor>& rows, int64_t topk) {
  const ace_hg::Feat pn_type = check_feat(pn, "pn");
  check_cuda(inv_norm, "inv_norm");
  check_same_device(inv_norm, "inv_norm", pn, "pn");
  if (rows.has_value()) {
    check_cuda(*rows, "rows");
    check_same_device(*rows, "rows", pn, "pn");
  }
  check_topk_shapes(pn, inv_norm, rows, topk);
  const int64_t B = pn.size(0), M = pn.size(1), D = pn.size(2);
  const int64_t R = rows.has_value() ? rows->size(1) : M;
  c10::cuda::CUDAGuard guard(pn.device());
  const size_t shared = ace_hg::topk_incidence_shared_bytes(D);
  if (shared > 48 * 1024) {  // beyond what any kernel may use: the device's opt-in limit decides
    int optin = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, pn.get_device());
    TORCH_CHECK(err == cudaSuccess, "ace_kernels::hg_topk_incidence: ", cudaGetErrorString(err));
    TORCH_CHECK(shared <= static_cast<size_t>(optin), "argument 'pn': feature width D = ", D, " needs ", shared,
                " bytes of shared memory per block in the top-k kernel, over the ", optin, " this device allows");
  }
  auto idx = at::empty({B, R, topk}, pn.options().dtype(at::kLong));
  auto w = at::empty({B, R, topk}, pn.options().dtype(at::kFloat));
  check_launch(ace_hg::topk_incidence(pn.data_ptr(), pn_type, pn.stride(0), pn.stride(1), pn.stride(2),
                                      inv_norm.data_ptr<float>(), inv_norm.stride(0), inv_norm.stride(1),
                                      rows.has_value() ? rows->data_ptr<int64_t>() : nullptr,
                                      rows.has_value() ? rows->stride(0) : 0, rows.has_value() ? rows->stride(1) : 0,
                                      idx.data_ptr<int64_t>(), w.data_ptr<float>(), B, M, D, R,
                                      static_cast<int>(topk), c10::cuda::getCurrentCUDAStream()),
               "hg_topk_incidence");
  return {idx, w};
}

at::Tensor hg_gather_sum_cuda(const at::Tensor& src, const at::Tensor& cols, const at::Tensor& weights) {
  const ace_hg::Feat src_type = check_feat(src, "src");
  check_cuda(cols, "cols");
  check_cuda(weights, "weights");
  check_same_device(cols, "cols", src, "src");
  check_same_device(weights, "weights", src, "src");
  check_gather_shapes(src, cols, weights);
  const int64_t B = src.size(0), D = src.size(2), Q = cols.size(1), S = cols.size(2);
  c10::cuda::CUDAGuard guard(src.device());
  auto out = at::empty({B, Q, D}, src.options().dtype(at::kFloat));
  check_launch(ace_hg::gather_sum(src.data_ptr(), src_type, src.stride(0), src.stride(1), src.stride(2),
                                  cols.data_ptr<int64_t>(), cols.stride(0), cols.stride(1), cols.stride(2),
                                  weights.data_ptr<float>(), weights.stride(0), weights.stride(1), weights.stride(2),
                                  out.data_ptr<float>(), B, Q, S, D, c10::cuda::getCurrentCUDAStream()),
               "hg_gather_sum");
  return out;
}

at::Tensor hg_scatter_sum_csr_cuda(const at::Tensor& src, const at::Tensor& weights_flat, const at::Tensor& row_ptr,
                                   const at::Tensor& perm, int64_t num_rows, int64_t slots) {
  const ace_hg::Feat src_type = check_feat(src, "src");
  check_cuda(weights_flat, "weights_flat");
  check_cuda(row_ptr, "row_ptr");
  check_cuda(perm, "perm");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weights_flat, "weights_flat"},
                                {row_ptr, "row_ptr"}, {perm, "perm"}}) {
    check_same_device(t, name, src, "src");
  }
  check_scatter_shapes(src, weights_flat, row_ptr, perm, num_rows, slots);
  const int64_t B = src.size(0), D = src.size(2);
  c10::cuda::CUDAGuard guard(src.device());
  auto out = at::empty({B, num_rows, D}, src.options().dtype(at::kFloat));
  check_launch(ace_hg::scatter_sum_csr(src.data_ptr(), src_type, src.stride(0), src.stride(1), src.stride(2),
                                       weights_flat.data_ptr<float>(), weights_flat.stride(0),
                                       row_ptr.data_ptr<int64_t>(), row_ptr.stride(0), perm.data_ptr<int64_t>(),
                                       perm.stride(0), out.data_ptr<float>(), B, num_rows, slots, D,
                                       c10::cuda::getCurrentCUDAStream()),
               "hg_scatter_sum_csr");
  return out;
}

at::Tensor hg_entry_dot_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cols) {
  const ace_hg::Feat a_type = check_feat(a, "a");
  const ace_hg::Feat b_type = check_feat(b, "b");
  check_cuda(cols, "cols");
  check_same_device(b, "b", a, "a");
  check_same_device(cols, "cols", a, "a");
  check_entry_dot_shapes(a, b, cols);
  const int64_t B = a.size(0), Q = a.size(1), D = a.size(2), S = cols.size(2);
  c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({B, Q, S}, a.options().dtype(at::kFloat));
  check_launch(ace_hg::entry_dot(a.data_ptr(), a_type, a.stride(0), a.stride(1), a.stride(2), b.data_ptr(), b_type,
                                 b.stride(0), b.stride(1), b.stride(2), cols.data_ptr<int64_t>(), cols.stride(0),
                                 cols.stride(1), cols.stride(2), out.data_ptr<float>(), B, Q, S, D,
                                 c10::cuda::getCurrentCUDAStream()),
               "hg_entry_dot");
  return out;
}

// Shape-only versions for fake tensors (torch.compile, opcheck), with the kernels' shape checks. Sizes are
// read as SymInts (sym_size, empty_symint), here and in the checks: size() specialised every dimension of a
// symbolic tensor to its traced value, so a dynamic batch recompiled at each size (mark_dynamic: an error).
std::tuple<at::Tensor, at::Tensor> hg_topk_incidence_meta(const at::Tensor& pn, const at::Tensor& inv_norm,
                                                          const c10::optional<at::Tensor>& rows, int64_t topk) {
  check_topk_shapes(pn, inv_norm, rows, topk);
  const c10::SymInt R = rows.has_value() ? rows->sym_size(1) : pn.sym_size(1);
  return {at::empty_symint({pn.sym_size(0), R, c10::SymInt(topk)}, pn.options().dtype(at::kLong)),
          at::empty_symint({pn.sym_size(0), R, c10::SymInt(topk)}, pn.options().dtype(at::kFloat))};
}

at::Tensor hg_gather_sum_meta(const at::Tensor& src, const at::Tensor& cols, const at::Tensor& weights) {
  check_gather_shapes(src, cols, weights);
  return at::empty_symint({src.sym_size(0), cols.sym_size(1), src.sym_size(2)}, src.options().dtype(at::kFloat));
}

at::Tensor hg_scatter_sum_csr_meta(const at::Tensor& src, const at::Tensor& weights_flat, const at::Tensor& row_ptr,
                                   const at::Tensor& perm, int64_t num_rows, int64_t slots) {
  check_scatter_shapes(src, weights_flat, row_ptr, perm, num_rows, slots);
  return at::empty_symint({src.sym_size(0), c10::SymInt(num_rows), src.sym_size(2)}, src.options().dtype(at::kFloat));
}

at::Tensor hg_entry_dot_meta(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cols) {
  check_entry_dot_shapes(a, b, cols);
  return at::empty_symint({a.sym_size(0), a.sym_size(1), cols.sym_size(2)}, a.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(ace_kernels, m) {
  m.def("hg_topk_incidence(Tensor pn, Tensor inv_norm, Tensor? rows, int topk) -> (Tensor, Tensor)");
  m.def("hg_gather_sum(Tensor src, Tensor cols, Tensor weights) -> Tensor");
  m.def("hg_scatter_sum_csr(Tensor src, Tensor weights_flat, Tensor row_ptr, Tensor perm, int num_rows, int slots) "
        "-> Tensor");
  m.def("hg_entry_dot(Tensor a, Tensor b, Tensor cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(ace_kernels, CUDA, m) {
  m.impl("hg_topk_incidence", &hg_topk_incidence_cuda);
  m.impl("hg_gather_sum", &hg_gather_sum_cuda);
  m.impl("hg_scatter_sum_csr", &hg_scatter_sum_csr_cuda);
  m.impl("hg_entry_dot", &hg_entry_dot_cuda);
}

// CPU tensors reach the CUDA kernels' argument checks, which name the argument that is not a
// CUDA tensor (instead of the dispatcher's "could not run ... with arguments from the 'CPU' backend").
TORCH_LIBRARY_IMPL(ace_kernels, CPU, m) {
  m.impl("hg_topk_incidence", &hg_topk_incidence_cuda);
  m.impl("hg_gather_sum", &hg_gather_sum_cuda);
  m.impl("hg_scatter_sum_csr", &hg_scatter_sum_csr_cuda);
  m.impl("hg_entry_dot", &hg_entry_dot_cuda);
}

TORCH_LIBRARY_IMPL(ace_kernels, Meta, m) {
  m.impl("hg_topk_incidence", &hg_topk_incidence_meta);
  m.impl("hg_gather_sum", &hg_gather_sum_meta);
  m.impl("hg_scatter_sum_csr", &hg_scatter_sum_csr_meta);
  m.impl("hg_entry_dot", &hg_entry_dot_meta);
}

// What the build compiled the kernels for (setup.py: TORCH_CUDA_ARCH_LIST), e.g. sm_90a or
// sm_90a__compute_90 (machine code, then PTX); ace_kernels reads it as _C.CUDA_ARCHS.
#ifndef ACE_KERNELS_CUDA_ARCHS
#define ACE_KERNELS_CUDA_ARCHS
#endif
// The sha256 of the csrc/ it was built from (ace_kernels/_sources.py), read as _C.SOURCES_SHA256: in a
// checkout, the cuda backend declines an extension built from other sources than those beside it.
#ifndef ACE_KERNELS_SOURCES_SHA256
#define ACE_KERNELS_SOURCES_SHA256
#endif
#define ACE_KERNELS_STR2(x) #x
#define ACE_KERNELS_STR(x) ACE_KERNELS_STR2(x)

// `import ace_kernels._C` loads this shared library (running the registrations above).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "ace-kernels CUDA ops, registered as torch.ops.ace_kernels.*", -1,
                                          nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      (PyModule_AddStringConstant(module, "CUDA_ARCHS", ACE_KERNELS_STR(ACE_KERNELS_CUDA_ARCHS)) != 0 ||
       PyModule_AddStringConstant(module, "SOURCES_SHA256", ACE_KERNELS_STR(ACE_KERNELS_SOURCES_SHA256)) != 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

#endif  // __cplusplus >= 202002L
