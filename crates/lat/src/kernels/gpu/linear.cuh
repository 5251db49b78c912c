// Non-causal linear attention (see linear.rs): out = q̂ (k̂ᵀ v) with q̂ the softmax of each
// query over its features / sqrt(e) and k̂ the softmax of each key feature over the positions.
// Keys come from a context of length m (a.m) with its own mask.
//
// Scratch: s0 = per-feature max and sum of the keys [BH][2][e], s1 = context k̂ᵀv [BH][e*ev],
//          s2 = its gradient [BH][e*ev]. The context sums are split over a.nc blocks per head
//          and added atomically (s1 and s2 start at zero).

// grid (1, BH). Groups of e threads walk the positions; each thread keeps a running max and
// sum of exponentials for one feature, merged at the end.
template <typename T>
__device__ void lin_key_stats(const Args a) {
    SHARED_FLOATS(sm);
    const int t = blockIdx.y, e = a.e, groups = THREADS / e;
    const int f = threadIdx.x % e, grp = threadIdx.x / e;
    const T* k = (const T*)a.k;
    float mx = -INFINITY, s = 0.f;
    if (grp < groups) {
        for (int j = grp; j < a.m; j += groups) {
            if (!kept(a, t, a.m, j)) continue;
            float x = ld(k[row(a, t, a.m, j, e) + f]);
            if (x > mx) { s = s * expf(mx - x) + 1.f; mx = x; } else { s += expf(x - mx); }
        }
    }
    float *mxs = sm, *ss = sm + THREADS;
    mxs[threadIdx.x] = mx;
    ss[threadIdx.x] = s;
    __syncthreads();
    if ((int)threadIdx.x < e) {
        float m = -INFINITY, sum = 0.f;
        for (int g = 0; g < groups; g++) m = fmaxf(m, mxs[g * e + f]);
        for (int g = 0; g < groups && m > -INFINITY; g++) sum += ss[g * e + f] * expf(mxs[g * e + f] - m);
        a.s0[(long)t * 2 * e + f] = m;
        a.s0[(long)t * 2 * e + e + f] = sum;
    }
}

// k̂ and v for keys [j0, j0 + rows) into shared memory (zero for masked keys).
template <typename T>
__device__ __forceinline__ void load_keys(const Args& a, int t, int j0, int rows, float* kh, float* vv) {
    const int e = a.e, ev = a.ev;
    const float* stats = a.s0 + (long)t * 2 * e;
    load_rows<T>(a, a.k, t, a.m, j0, rows, e, kh);
    load_rows<T>(a, a.v, t, a.m, j0, rows, ev, vv);
    __syncthreads();
    for (int x = threadIdx.x; x < rows * e; x += THREADS) {
        int f = x % e;
        kh[x] = (kept(a, t, a.m, j0 + x / e) && stats[f] > -INFINITY) ? expf(kh[x] - stats[f]) / stats[e + f] : 0.f;
    }
    for (int x = threadIdx.x; x < rows * ev; x += THREADS)
        if (!kept(a, t, a.m, j0 + x / ev)) vv[x] = 0.f;
    __syncthreads();
}

// Positions [lo, hi) of split blockIdx.x out of a.nc over a length.
__device__ __forceinline__ void split_range(const Args& a, int len, int* lo, int* hi) {
    int per = (len + a.nc - 1) / a.nc;
    *lo = min(len, (int)blockIdx.x * per);
    *hi = min(len, *lo + per);
}

// grid (nc, BH): s1 += Σ k̂ vᵀ over this block's keys.
template <typename T>
__device__ void lin_context(const Args a) {
    SHARED_FLOATS(sm);
    const int t = blockIdx.y, e = a.e, ev = a.ev;
    float *kh = sm, *vv = kh + TILE * e;
    int lo, hi;
    split_range(a, a.m, &lo, &hi);
    float acc[MAX_DIM * MAX_DIM / THREADS] = {0.f};
    for (int j0 = lo; j0 < hi; j0 += TILE) {
        int rows = min(TILE, hi - j0);
        load_keys<T>(a, t, j0, rows, kh, vv);
        add_outer(acc, kh, vv, rows, e, ev);
        __syncthreads();
    }
    for (int r = 0, x = threadIdx.x; x < e * ev; r++, x += THREADS) atomicAdd(a.s1 + (long)t * e * ev + x, acc[r]);
}

// Softmax of query rows [i0, i0 + rows) into shared memory.
template <typename T>
__device__ __forceinline__ void load_queries(const Args& a, int t, int i0, int rows, float* qh) {
    load_rows<T>(a, a.q, t, a.n, i0, rows, a.e, qh);
    __syncthreads();
    softmax_rows(qh, rows, a.e, rsqrtf((float)a.e));
    __syncthreads();
}

// grid (ceil(n / TILE), BH).
template <typename T>
__device__ void lin_forward(const Args a) {
    SHARED_FLOATS(sm);
    const int t = blockIdx.y, e = a.e, ev = a.ev, i0 = blockIdx.x * TILE, rows = min(TILE, a.n - i0);
    const float* ctx = a.s1 + (long)t * e * ev;
    float* qh = sm;
    load_queries<T>(a, t, i0, rows, qh);
    T* out = (T*)a.o0;
    for (int x = threadIdx.x; x < rows * ev; x += THREADS) {
        int i = x / ev, col = x % ev;
        float acc = 0.f;
        for (int f = 0; f < e; f++) acc += qh[i * e + f] * ctx[f * ev + col];
        out[row(a, t, a.n, i0 + i, ev) + col] = st<T>(acc);
    }
}

// grid (nc, BH): s2 += Σ q̂ gᵀ over this block's queries.
template <typename T>
__device__ void lin_context_grad(const Args a) {
    SHARED_FLOATS(sm);
    const int t = blockIdx.y, e = a.e, ev = a.ev;
    float *qh = sm, *gg = qh + TILE * e;
    int lo, hi;
    split_range(a, a.n, &lo, &hi);
    float acc[MAX_DIM * MAX_DIM / THREADS] = {0.f};
    for (int i0 = lo; i0 < hi; i0 += TILE) {
        int rows = min(TILE, hi - i0);
        load_rows<T>(a, a.g, t, a.n, i0, rows, ev, gg);
        load_queries<T>(a, t, i0, rows, qh);
        add_outer(acc, qh, gg, rows, e, ev);
        __syncthreads();
    }
    for (int r = 0, x = threadIdx.x; x < e * ev; r++, x += THREADS) atomicAdd(a.s2 + (long)t * e * ev + x, acc[r]);
}

// grid (ceil(n / TILE), BH): dq.
template <typename T>
__device__ void lin_query_grad(const Args a) {
    SHARED_FLOATS(sm);
    const int t = blockIdx.y, e = a.e, ev = a.ev, i0 = blockIdx.x * TILE, rows = min(TILE, a.n - i0);
    const float* ctx = a.s1 + (long)t * e * ev;
    float *qh = sm, *gg = qh + TILE * e, *dqh = gg + TILE * ev, *dot = dqh + TILE * e;
    load_rows<T>(a, a.g, t, a.n, i0, rows, ev, gg);
    load_queries<T>(a, t, i0, rows, qh);
    for (int x = threadIdx.x; x < rows * e; x += THREADS) {
        int i = x / e, f = x % e;
        float acc = 0.f;
        for (int col = 0; col < ev; col++) acc += ctx[f * ev + col] * gg[i * ev + col];
        dqh[x] = acc;
    }
    __syncthreads();
    const float scale = rsqrtf((float)e);
    for (int i = threadIdx.x; i < rows; i += THREADS) {
        float s = 0.f;
        for (int f = 0; f < e; f++) s += qh[i * e + f] * dqh[i * e + f];
        dot[i] = s / scale;
    }
    __syncthreads();
    T* dq = (T*)a.o0;
    for (int x = threadIdx.x; x < rows * e; x += THREADS)
        dq[row(a, t, a.n, i0 + x / e, e) + x % e] = st<T>(qh[x] * (dqh[x] - dot[x / e]));
}

// grid (ceil(m / TILE), BH): dk and dv. The softmax over positions needs Σ_j k̂ dk̂ per
// feature, which equals Σ_col context * dcontext.
template <typename T>
__device__ void lin_key_grad(const Args a) {
    SHARED_FLOATS(sm);
    const int t = blockIdx.y, e = a.e, ev = a.ev, j0 = blockIdx.x * TILE, rows = min(TILE, a.m - j0);
    const float *ctx = a.s1 + (long)t * e * ev, *dctx = a.s2 + (long)t * e * ev;
    float *kh = sm, *vv = kh + TILE * e, *gamma = vv + TILE * ev;
    for (int f = threadIdx.x; f < e; f += THREADS) {
        float s = 0.f;
        for (int col = 0; col < ev; col++) s += ctx[f * ev + col] * dctx[f * ev + col];
        gamma[f] = s;
    }
    load_keys<T>(a, t, j0, rows, kh, vv);
    T *dk = (T*)a.o1, *dv = (T*)a.o2;
    for (int x = threadIdx.x; x < rows * e; x += THREADS) {
        int j = x / e, f = x % e;
        float acc = 0.f;
        for (int col = 0; col < ev; col++) acc += dctx[f * ev + col] * vv[j * ev + col];
        dk[row(a, t, a.m, j0 + j, e) + f] = st<T>(kh[x] * (acc - gamma[f]));
    }
    for (int x = threadIdx.x; x < rows * ev; x += THREADS) {
        int j = x / ev, col = x % ev;
        float acc = 0.f;
        if (kept(a, t, a.m, j0 + j))
            for (int f = 0; f < e; f++) acc += kh[j * e + f] * dctx[f * ev + col];
        dv[row(a, t, a.m, j0 + j, ev) + col] = st<T>(acc);
    }
}
