// CUDA kernels for grass_index::sjlt and grass_index::mask. Torch-free on purpose: this
// file includes only CUDA headers, so it compiles (nvcc -c) without a CUDA build of torch,
// and CI can check it. ops_cuda.cpp (the torch binding) validates inputs, prepares the
// inverse index, picks the stream and calls the extern "C" launchers below.
//
// sjlt is deterministic: no atomics. The binding sorts the flattened idx stably and hands
// over the CSR inverse (bucket b owns entries offsets[b]..offsets[b+1] of cols/signs, in
// ascending flat-position order). One warp reduces one (row, bucket) pair: lanes stride
// over the bucket's entries, accumulate in float (double for double inputs), then a fixed
// xor-shuffle tree combines them, so the sum's order depends only on idx, never on timing.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kWarpsPerBlock = 8;

// grid.x: bucket groups of kWarpsPerBlock; grid.y: row chunks. Each warp owns one bucket
// and walks the rows of its chunk, so the bucket's entries stay in L1 across rows.
template <typename T>
__global__ void sjlt_gather_reduce(const T* __restrict__ x, T* __restrict__ out,
                                   const int64_t* __restrict__ cols, const float* __restrict__ signs,
                                   const int64_t* __restrict__ offsets, int64_t n_rows, int64_t d,
                                   int64_t k, int64_t rows_per_chunk) {
  typedef typename Acc<T>::type acc_t;
  const int lane = threadIdx.x & 31;
  const int64_t bucket = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (bucket >= k) return;
  const int64_t begin = offsets[bucket], end = offsets[bucket + 1];
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk;
  const int64_t r1 = min(n_rows, r0 + rows_per_chunk);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    acc_t acc = 0;
    for (int64_t e = begin + lane; e < end; e += 32) acc += to_acc(xr[cols[e]]) * (acc_t)signs[e];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) out[r * k + bucket] = from_acc<T>(acc);
  }
}

// out[n, i] = x[n, idx[i]]; word_t is the element's storage (the gather ignores dtype).
template <typename word_t>
__global__ void mask_gather(const word_t* __restrict__ x, word_t* __restrict__ out,
                            const int64_t* __restrict__ idx, int64_t n_rows, int64_t d, int64_t m) {
  const int64_t total = n_rows * m;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = t / m, i = t - n * m;
    out[t] = x[n * d + idx[i]];
  }
}

template <typename T>
cudaError_t launch_sjlt(const void* x, void* out, const int64_t* cols, const float* signs,
                        const int64_t* offsets, int64_t n_rows, int64_t d, int64_t k, cudaStream_t stream) {
  const int64_t rows_per_chunk = 8;
  const int64_t gy = (n_rows + rows_per_chunk - 1) / rows_per_chunk;
  if (gy > 65535) return cudaErrorInvalidConfiguration;  // binding splits larger batches
  dim3 grid((unsigned)((k + kWarpsPerBlock - 1) / kWarpsPerBlock), (unsigned)gy);
  sjlt_gather_reduce<T><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(out), cols, signs, offsets, n_rows, d, k, rows_per_chunk);
  return cudaGetLastError();
}

template <typename word_t>
cudaError_t launch_mask(const void* x, void* out, const int64_t* idx, int64_t n_rows, int64_t d, int64_t m,
                        cudaStream_t stream) {
  const int threads = 256;
  const int64_t want = (n_rows * m + threads - 1) / threads;
  const unsigned blocks = (unsigned)(want < 65535 * 8 ? want : 65535 * 8);
  mask_gather<word_t><<<blocks, threads, 0, stream>>>(static_cast<const word_t*>(x), static_cast<word_t*>(out),
                                                      idx, n_rows, d, m);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16. x [n_rows, d] and out [n_rows, k]
// contiguous; cols/signs [nnz] sorted by bucket; offsets [k + 1]. Returns a cudaError_t.
int grass_index_sjlt_cuda(int dtype, const void* x, void* out, const int64_t* cols, const float* signs,
                          const int64_t* offsets, int64_t n_rows, int64_t d, int64_t k, cudaStream_t stream) {
  switch (dtype) {
    case 0: return (int)launch_sjlt<float>(x, out, cols, signs, offsets, n_rows, d, k, stream);
    case 1: return (int)launch_sjlt<double>(x, out, cols, signs, offsets, n_rows, d, k, stream);
    case 2: return (int)launch_sjlt<__half>(x, out, cols, signs, offsets, n_rows, d, k, stream);
    case 3: return (int)launch_sjlt<__nv_bfloat16>(x, out, cols, signs, offsets, n_rows, d, k, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

// element_size: 2, 4 or 8 bytes. x [n_rows, d], out [n_rows, m] contiguous, idx [m].
int grass_index_mask_cuda(int element_size, const void* x, void* out, const int64_t* idx, int64_t n_rows,
                          int64_t d, int64_t m, cudaStream_t stream) {
  switch (element_size) {
    case 2: return (int)launch_mask<uint16_t>(x, out, idx, n_rows, d, m, stream);
    case 4: return (int)launch_mask<uint32_t>(x, out, idx, n_rows, d, m, stream);
    case 8: return (int)launch_mask<uint64_t>(x, out, idx, n_rows, d, m, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // extern "C"
