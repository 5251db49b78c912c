// Every kernel of the GPU backend, as one module. LAT_KERNELS lists them; each is instantiated
// per element type as name_f32 and name_bf16.
#include "common.cuh"
#include "causal_linear.cuh"
#include "linear.cuh"
#include "local.cuh"

#define LAT_KERNELS(X)                          \
    X(cla_chunk_sums) X(cla_prefix)             \
    X(cla_forward) X(cla_query_sums)            \
    X(cla_suffix) X(cla_backward)               \
    X(lin_key_stats) X(lin_context)             \
    X(lin_forward) X(lin_context_grad)          \
    X(lin_query_grad) X(lin_key_grad)           \
    X(loc_forward) X(loc_query_grad)            \
    X(loc_key_grad)

#define INSTANTIATE(name)                                        \
    KERNEL name##_f32(const Args a) { name<float>(a); }          \
    KERNEL name##_bf16(const Args a) { name<bf16>(a); }

#ifdef __CUDACC__
LAT_KERNELS(INSTANTIATE)
#endif
