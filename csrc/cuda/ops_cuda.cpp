// Torch binding for the CUDA kernels in kernels.cu: validation (same messages as the CPU
// kernel and grass_index/ops/checks.py), device guard, current stream, launch checks.
//
// No host sync per call: checking idx/sign values and building the SJLT bucket inverse both
// need the host (min/max, bincount), so they run once per index buffer and the result is
// cached ("plan"), keyed by the buffer's TensorImpl, its version counter (an in-place change
// invalidates the plan) and k. The plan holds a reference to the buffers, so their address
// cannot be reused by another tensor while cached. Compressors pass the same buffers on
// every call, so after the first call a sketch launches kernels only.
// Compiled only when torch is a CUDA build (setup.py), because c10/cuda headers are
// missing from CPU wheels.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <deque>
#include <mutex>
#include <vector>

#include "../checks.h"

extern "C" int grass_index_sjlt_cuda(int dtype, const void* x, void* out, const int64_t* cols, const float* signs,
                                     const int64_t* offsets, int64_t n_rows, int64_t d, int64_t k,
                                     cudaStream_t stream);
extern "C" int grass_index_mask_cuda(int element_size, const void* x, void* out, const int64_t* idx, int64_t n_rows,
                                     int64_t d, int64_t m, cudaStream_t stream);

namespace grass_index {
namespace {

int dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return 0;
    case c10::ScalarType::Double: return 1;
    case c10::ScalarType::Half: return 2;
    case c10::ScalarType::BFloat16: return 3;
    default: TORCH_CHECK(false, "grass_index.sjlt: unsupported dtype ", py_dtype(t));
  }
  return -1;
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "grass_index.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

uint32_t version(const at::Tensor& t) { return t.unsafeGetTensorImpl()->version_counter().current_version(); }

// A validated (idx, sign, k) and the CSR inverse of idx: bucket b owns entries
// offsets[b]..offsets[b+1] of cols/signs, in ascending flat-position order.
struct SjltPlan {
  at::Tensor idx, sign;
  uint32_t idx_version, sign_version;
  int64_t k;
  at::Tensor cols, signs, offsets;
};

// A validated mask index for input width d.
struct MaskPlan {
  at::Tensor idx;
  uint32_t idx_version;
  int64_t d;
};

constexpr size_t kMaxPlans = 256;  // buffers are small; a model has a few per layer
std::mutex g_plans_mutex;
std::deque<SjltPlan> g_sjlt_plans;
std::deque<MaskPlan> g_mask_plans;

SjltPlan build_sjlt_plan(const at::Tensor& idx, const at::Tensor& sign, int64_t k, int64_t d) {
  const at::Tensor flat = idx.reshape({-1}).contiguous();
  const at::Tensor sflat = sign.reshape({-1}).contiguous();
  // Value checks (host syncs, once per buffer): same messages as on CPU.
  const int64_t lo = flat.min().item<int64_t>(), hi = flat.max().item<int64_t>();
  if (lo < 0 || hi >= k) fail_idx_range(k, lo, hi);
  if (!sflat.eq(1).logical_or(sflat.eq(-1)).all().item<bool>()) fail_sign_values();
  // stable sort by bucket, so ties keep flat order and the kernel's sum order is fixed
  const at::Tensor order = at::argsort(flat, /*stable=*/true);
  const at::Tensor cols = order.remainder(d).contiguous();
  const at::Tensor signs = sflat.index_select(0, order).to(at::kFloat).contiguous();
  const at::Tensor counts = at::bincount(flat, /*weights=*/{}, /*minlength=*/k);
  const at::Tensor offsets = at::cat({at::zeros({1}, flat.options()), at::cumsum(counts, 0)}).contiguous();
  return SjltPlan{idx, sign, version(idx), version(sign), k, cols, signs, offsets};
}

SjltPlan sjlt_plan(const at::Tensor& idx, const at::Tensor& sign, int64_t k, int64_t d) {
  std::lock_guard<std::mutex> lock(g_plans_mutex);
  for (const SjltPlan& p : g_sjlt_plans) {
    if (p.idx.unsafeGetTensorImpl() == idx.unsafeGetTensorImpl() &&
        p.sign.unsafeGetTensorImpl() == sign.unsafeGetTensorImpl() && p.k == k &&
        p.idx_version == version(idx) && p.sign_version == version(sign))
      return p;
  }
  SjltPlan plan = build_sjlt_plan(idx, sign, k, d);
  g_sjlt_plans.push_back(plan);
  if (g_sjlt_plans.size() > kMaxPlans) g_sjlt_plans.pop_front();
  return plan;
}

void check_mask_plan(const at::Tensor& ic, const at::Tensor& idx, int64_t d) {
  std::lock_guard<std::mutex> lock(g_plans_mutex);
  for (const MaskPlan& p : g_mask_plans) {
    if (p.idx.unsafeGetTensorImpl() == idx.unsafeGetTensorImpl() && p.d == d &&
        p.idx_version == version(idx))
      return;
  }
  const int64_t lo = ic.min().item<int64_t>(), hi = ic.max().item<int64_t>();  // once per buffer
  if (lo < 0 || hi >= d) fail_mask_range(d, lo, hi);
  g_mask_plans.push_back(MaskPlan{idx, version(idx), d});
  if (g_mask_plans.size() > kMaxPlans) g_mask_plans.pop_front();
}

at::Tensor sjlt_cuda(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& sign, int64_t k) {
  check_sjlt_meta(x, idx, sign, k);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(-1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = k;
  if (idx.numel() == 0) return at::zeros(out_shape, x.options());
  const SjltPlan plan = sjlt_plan(idx, sign, k, d);
  if (x.numel() == 0) return at::zeros(out_shape, x.options());
  at::Tensor out = at::empty(out_shape, x.options());
  const at::Tensor xc = x.contiguous();
  const int64_t n_rows = x.numel() / d;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t kMaxRows = 65535 * 8;  // grid.y limit of the launcher
  for (int64_t r = 0; r < n_rows; r += kMaxRows) {
    const int64_t nr = std::min(kMaxRows, n_rows - r);
    const char* xp = static_cast<const char*>(xc.const_data_ptr()) + r * d * xc.element_size();
    char* op = static_cast<char*>(out.mutable_data_ptr()) + r * k * out.element_size();
    check_launch(grass_index_sjlt_cuda(dtype_code(x.scalar_type()), xp, op, plan.cols.const_data_ptr<int64_t>(),
                                       plan.signs.const_data_ptr<float>(), plan.offsets.const_data_ptr<int64_t>(),
                                       nr, d, k, stream),
                 "sjlt");
  }
  return out;
}

at::Tensor mask_cuda(const at::Tensor& x, const at::Tensor& idx) {
  check_mask_meta(x, idx);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(-1), m = idx.size(0);
  const at::Tensor ic = idx.contiguous();
  if (m > 0) check_mask_plan(ic, idx, d);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = m;
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(grass_index_mask_cuda(static_cast<int>(x.element_size()), xc.const_data_ptr(), out.mutable_data_ptr(),
                                     ic.const_data_ptr<int64_t>(), out.numel() / m, d, m, stream),
               "mask");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grass_index, CUDA, m) {
  m.impl("sjlt", &sjlt_cuda);
  m.impl("mask", &mask_cuda);
}

}  // namespace grass_index
