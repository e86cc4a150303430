// Copy kernels of the KV ring buffer: plain C++ declarations, no torch headers, so the
// .cu file compiles in seconds with nvcc alone.
#pragma once

#include <cstdint>

namespace kvlock {

// dst[i, :] = src[rows[i], :] for i in [0, num_rows), rows of `row_bytes` bytes each.
// src rows are `src_row_stride_bytes` apart, dst rows are packed.  `rows` is a device
// array of int64 indices (already validated).  Enqueued on `stream` (a cudaStream_t).
// Returns 0 on success, or the cudaError_t of the launch.
int gather_rows_cuda(const void* src, int64_t src_row_stride_bytes, void* dst, const int64_t* rows,
                     int64_t num_rows, int64_t row_bytes, void* stream);

}  // namespace kvlock
