// host_harness.h -- compile the CUDA kernels of this folder as ordinary C++ (g++).
//
// Maps the CUDA qualifiers to host equivalents and provides the built-in index variables
// (threadIdx, blockIdx, blockDim, gridDim) as thread-local values. host_launch() runs a
// __global__ function over the whole grid: blocks are distributed over OpenMP threads
// (when compiled with -fopenmp), threads of a block run sequentially, so the very same
// kernel source gives a CPU backend with one loop iteration per CUDA thread. Kernels must
// not use __syncthreads or shared memory (ours do not: one independent thread per site).
// The complex type cplx<T> (su_n.cuh) is shared with the device build; its interleaved
// layout is that of std::complex<T> and torch complex storage.
#ifndef HPCFLOW_HOST_HARNESS_H
#define HPCFLOW_HOST_HARNESS_H

#ifdef __CUDACC__
#error "host_harness.h is for host (g++) builds only"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))

namespace hpcflow_host {

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

}  // namespace hpcflow_host

// CUDA names these in the global namespace. initial-exec TLS: a plain %fs-relative load
// instead of a __tls_get_addr call per CUDA thread in a dlopen-ed library (48 bytes of
// static TLS, well inside glibc's reserve; libgomp uses the same model).
using hpcflow_host::dim3;
#define HPCFLOW_TLS thread_local __attribute__((tls_model("initial-exec")))
inline HPCFLOW_TLS dim3 threadIdx;
inline HPCFLOW_TLS dim3 blockIdx;
inline HPCFLOW_TLS dim3 blockDim;
inline HPCFLOW_TLS dim3 gridDim;

namespace hpcflow_host {

// Equivalent of kernel<<<grid, block>>>(args...) for 1-D grids.
template <typename Kernel, typename... Args>
void host_launch(Kernel kernel, unsigned int grid, unsigned int block, Args... args) {
#pragma omp parallel
    {
        blockDim.x = block;
        gridDim.x = grid;
#pragma omp for schedule(static)
        for (long long bx = 0; bx < (long long)grid; ++bx) {
            blockIdx.x = (unsigned int)bx;
            for (unsigned int tx = 0; tx < block; ++tx) {
                threadIdx.x = tx;
                kernel(args...);
            }
        }
    }
}

}  // namespace hpcflow_host

#endif  // HPCFLOW_HOST_HARNESS_H
