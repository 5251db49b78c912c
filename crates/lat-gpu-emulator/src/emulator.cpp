#include "emulator.h"

#include <cstdio>
#include <limits>
#include <thread>
#include <vector>

#include "kernels.cu"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
thread_local float* emu_shared;
thread_local std::barrier<>* emu_barrier;

typedef void (*Kernel)(const Args);
struct Entry {
    const char* name;
    Kernel run;
};

#define ENTRIES(name) {#name "_f32", [](const Args a) { name<float>(a); }}, {#name "_bf16", [](const Args a) { name<bf16>(a); }},
static const Entry KERNELS[] = {LAT_KERNELS(ENTRIES)};

// The kernels' compile-time sizes, which the Rust launch plans must agree with:
// THREADS, CHUNK, MAX_DIM, TILE.
extern "C" void lat_kernel_constants(unsigned* out) {
    out[0] = THREADS;
    out[1] = CHUNK;
    out[2] = MAX_DIM;
    out[3] = TILE;
}

// Runs kernel `name` on a gx x gy grid of blocks of `threads` threads. Shared memory starts as
// NaN so that reading what no thread wrote shows in the results. Returns 0, or -1 for an
// unknown kernel.
extern "C" int lat_emulate(const char* name, unsigned gx, unsigned gy, unsigned threads, size_t shared_floats, const Args* args) {
    Kernel run = nullptr;
    for (const Entry& e : KERNELS)
        if (std::strcmp(e.name, name) == 0) run = e.run;
    if (!run) return -1;
    std::vector<float> shared(shared_floats + 1);
    for (unsigned by = 0; by < gy; by++) {
        for (unsigned bx = 0; bx < gx; bx++) {
            std::fill(shared.begin(), shared.end(), std::numeric_limits<float>::quiet_NaN());
            std::barrier<> barrier(threads);
            std::vector<std::thread> pool;
            for (unsigned tx = 0; tx < threads; tx++) {
                pool.emplace_back([&, tx] {
                    threadIdx = {tx, 0, 0};
                    blockIdx = {bx, by, 0};
                    blockDim = {threads, 1, 1};
                    gridDim = {gx, gy, 1};
                    emu_shared = shared.data();
                    emu_barrier = &barrier;
                    run(*args);
                    barrier.arrive_and_drop();
                });
            }
            for (auto& t : pool) t.join();
        }
    }
    return 0;
}
