// Shared by every kernel: element types, the argument block, and block-wide helpers.
// The same source compiles with nvcc for the GPU and, in the tests, as C++ on the CPU (see
// crates/lat-gpu-emulator), so it uses dynamic shared memory only, and no warp intrinsics.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
typedef __nv_bfloat16 bf16;
__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T st(float x);
template <> __device__ __forceinline__ float st<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 st<bf16>(float x) { return __float2bfloat16(x); }
#define SHARED_FLOATS(name) extern __shared__ float name[]
#define KERNEL extern "C" __global__ void __launch_bounds__(256)
#endif

#define THREADS 256
// Positions per chunk of the causal kernels (a multiple or a divisor of the bucket).
#define CHUNK 32
// Largest head dimension the kernels hold in shared memory.
#define MAX_DIM 64
// Rows per tile of the local and non-causal kernels.
#define TILE 32
#define EPS 1e-3f
#define FLT_TINY 1.17549435e-38f

// One argument block for every kernel: pointers are device addresses.
struct Args {
    const void* q;
    const void* k;
    const void* v;
    const void* g;        // gradient of the output
    const void* out;      // the forward output
    const unsigned char* keep; // [b, n] (1 = keep) or null
    void* o0;
    void* o1;
    void* o2;
    float* s0;            // float scratch / statistics
    float* s1;
    float* s2;
    float* s3;
    float* s4;
    int b, n, m, h;       // batch, query length, key length, heads
    int e, ev;            // head dims of q/k and of v
    int bucket;           // causal: blind-spot bucket
    int window, causal;   // local: window size, causal flag
    int nc;               // chunks or splits
};

// Row `i` of head `t = batch * h + head` in a [b, len, h, d] tensor.
__device__ __forceinline__ long row(const Args& a, int t, int len, int i, int d) {
    return ((long)(t / a.h) * len + i) * a.h * d + (long)(t % a.h) * d;
}

__device__ __forceinline__ bool kept(const Args& a, int t, int len, int j) {
    return a.keep == nullptr || a.keep[(long)(t / a.h) * len + j] != 0;
}

// Block-wide reductions through `red` (THREADS floats of shared memory). Every thread returns
// the result.
__device__ __forceinline__ float block_max(float x, float* red) {
    red[threadIdx.x] = x;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    float r = red[0];
    __syncthreads();
    return r;
}

// Softmax over the features of `rows` rows of `d` values held in shared memory, times `scale`,
// in place. One thread per row.
__device__ __forceinline__ void softmax_rows(float* x, int rows, int d, float scale) {
    for (int i = threadIdx.x; i < rows; i += THREADS) {
        float* r = x + i * d;
        float mx = -INFINITY;
        for (int f = 0; f < d; f++) mx = fmaxf(mx, r[f]);
        float s = 0.f;
        for (int f = 0; f < d; f++) { r[f] = expf(r[f] - mx); s += r[f]; }
        float inv = scale / s;
        for (int f = 0; f < d; f++) r[f] *= inv;
    }
}

// Copies `rows` rows of width d starting at position `i0` of head t into shared memory as
// floats (zero past `len`).
template <typename T>
__device__ __forceinline__ void load_rows(const Args& a, const void* src, int t, int len, int i0, int rows, int d, float* dst) {
    const T* p = (const T*)src;
    for (int x = threadIdx.x; x < rows * d; x += THREADS) {
        int i = x / d, f = x % d;
        dst[x] = (i0 + i < len) ? ld(p[row(a, t, len, i0 + i, d) + f]) : 0.f;
    }
}

// acc[r] += (aᵀb)[x] for this thread's entries x = threadIdx.x + r * THREADS of the e x ev
// product of a (rows x e) and b (rows x ev), both in shared memory.
__device__ __forceinline__ void add_outer(float* acc, const float* a, const float* b, int rows, int e, int ev) {
    for (int r = 0, x = threadIdx.x; x < e * ev; r++, x += THREADS) {
        int f = x / ev, col = x % ev;
        for (int j = 0; j < rows; j++) acc[r] += a[j * e + f] * b[j * ev + col];
    }
}
