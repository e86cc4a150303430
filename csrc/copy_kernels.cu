// Row gather for the compact KV ring buffer: copies the background token rows of a
// (S, ...) K or V tensor into a packed device slot in one kernel, with 16-byte vector
// accesses when alignment allows (K/V rows are H*D*2 bytes: multiples of 16 in practice).
#include <cuda_runtime.h>

#include "copy_kernels.h"

namespace kvlock {
namespace {

template <typename Vec>
__global__ void gather_rows_kernel(const char* __restrict__ src, int64_t src_stride, char* __restrict__ dst,
                                   const int64_t* __restrict__ rows, int64_t num_rows, int64_t vecs_per_row) {
  // grid.y walks rows (with a grid-stride loop past 65535), threads walk a row's vectors.
  for (int64_t r = blockIdx.y; r < num_rows; r += gridDim.y) {
    const Vec* in = reinterpret_cast<const Vec*>(src + rows[r] * src_stride);
    Vec* out = reinterpret_cast<Vec*>(dst) + r * vecs_per_row;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vecs_per_row;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      out[i] = in[i];
    }
  }
}

template <typename Vec>
int launch(const void* src, int64_t src_stride, void* dst, const int64_t* rows, int64_t num_rows, int64_t row_bytes,
           cudaStream_t stream) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int threads = 256;
  int64_t blocks_x = (vecs + threads - 1) / threads;
  if (blocks_x > 64) blocks_x = 64;
  const int64_t blocks_y = num_rows < 65535 ? num_rows : 65535;
  dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  gather_rows_kernel<Vec><<<grid, threads, 0, stream>>>(static_cast<const char*>(src), src_stride,
                                                          static_cast<char*>(dst), rows, num_rows, vecs);
  return static_cast<int>(cudaGetLastError());
}

bool aligned(const void* p, int64_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

}  // namespace

int gather_rows_cuda(const void* src, int64_t src_row_stride_bytes, void* dst, const int64_t* rows,
                     int64_t num_rows, int64_t row_bytes, void* stream) {
  if (num_rows == 0 || row_bytes == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (aligned(src, 16) && aligned(dst, 16) && src_row_stride_bytes % 16 == 0 && row_bytes % 16 == 0) {
    return launch<int4>(src, src_row_stride_bytes, dst, rows, num_rows, row_bytes, s);
  }
  if (aligned(src, 4) && aligned(dst, 4) && src_row_stride_bytes % 4 == 0 && row_bytes % 4 == 0) {
    return launch<int>(src, src_row_stride_bytes, dst, rows, num_rows, row_bytes, s);
  }
  return launch<char>(src, src_row_stride_bytes, dst, rows, num_rows, row_bytes, s);
}

}  // namespace kvlock
