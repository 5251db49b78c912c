// Runs CUDA kernels written for kernels.cu on the CPU: every GPU thread of a block is an OS
// thread, __syncthreads is a barrier, and dynamic shared memory is one buffer per block. Slow,
// but it runs the very same kernel source; shared memory starts as NaN, so a read of what no
// thread wrote (a missing barrier, a wrong offset) shows up in the results.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

struct dim3 { unsigned x = 0, y = 0, z = 0; };
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
extern thread_local float* emu_shared;
extern thread_local std::barrier<>* emu_barrier;

#define __device__
#define __global__
#define __forceinline__ inline
#define SHARED_FLOATS(name) float* name = emu_shared
#define KERNEL extern "C" void

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

using std::max;
using std::min;
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

// bfloat16 with round-to-nearest-even, as __float2bfloat16 does.
struct bf16 { uint16_t bits; };
inline float ld(float x) { return x; }
inline float ld(bf16 x) {
    uint32_t u = (uint32_t)x.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
template <typename T> T st(float x);
template <> inline float st<float>(float x) { return x; }
template <> inline bf16 st<bf16>(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16{(uint16_t)(u >> 16)};
}
