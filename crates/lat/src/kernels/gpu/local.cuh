// Local windowed softmax attention (see local.rs for the semantics): a query in window w sees
// the keys of windows w-1, w (and w+1 when not causal), up to itself when causal. The forward
// pass streams key tiles with an online softmax and keeps each row's log-sum-exp; the backward
// pass recomputes the probabilities, once per query tile (dq) and once per key tile (dk, dv).
// A row whose every slot is masked averages all its slots, pad slots (value -1) included.
//
// Scratch: s0 = log-sum-exp per row [BH][n] (-inf marks a row with every slot masked).

__device__ __forceinline__ int look_forward(const Args& a) { return a.causal ? 0 : 1; }
__device__ __forceinline__ int slots(const Args& a) { return (2 + look_forward(a)) * a.window; }

// Whether key j is one of query i's slots.
__device__ __forceinline__ bool in_slots(const Args& a, int i, int j) {
    int w = i / a.window;
    return j >= (w - 1) * a.window && j < (w + 1 + look_forward(a)) * a.window;
}

__device__ __forceinline__ bool sees(const Args& a, int t, int i, int j) {
    return in_slots(a, i, j) && kept(a, t, a.n, j) && (!a.causal || j <= i);
}

// The keys the queries [i0, i0 + rows) may see.
__device__ __forceinline__ void key_range(const Args& a, int i0, int rows, int* lo, int* hi) {
    *lo = max(0, (i0 / a.window - 1) * a.window);
    *hi = min(a.n, ((i0 + rows - 1) / a.window + 1 + look_forward(a)) * a.window);
}

// The queries that may see the keys [j0, j0 + rows).
__device__ __forceinline__ void query_range(const Args& a, int j0, int rows, int* lo, int* hi) {
    *lo = max(0, (j0 / a.window - look_forward(a)) * a.window);
    *hi = min(a.n, ((j0 + rows - 1) / a.window + 2) * a.window);
}

// Query rows scaled by 1/sqrt(e).
template <typename T>
__device__ __forceinline__ void load_scaled(const Args& a, int t, int i0, int rows, float* qs) {
    load_rows<T>(a, a.q, t, a.n, i0, rows, a.e, qs);
    __syncthreads();
    const float scale = rsqrtf((float)a.e);
    for (int x = threadIdx.x; x < rows * a.e; x += THREADS) qs[x] *= scale;
}

// Key and value rows [j0, j0 + rows) into shared memory, ready for every thread.
template <typename T>
__device__ __forceinline__ void load_key_tile(const Args& a, int t, int j0, int rows, float* ks, float* vs) {
    load_rows<T>(a, a.k, t, a.n, j0, rows, a.e, ks);
    load_rows<T>(a, a.v, t, a.n, j0, rows, a.e, vs);
    __syncthreads();
}

// grid (ceil(n / TILE), BH).
template <typename T>
__device__ void loc_forward(const Args a) {
    SHARED_FLOATS(sm);
    const int t = blockIdx.y, e = a.e, i0 = blockIdx.x * TILE, rows = min(TILE, a.n - i0);
    float *qs = sm, *ks = qs + TILE * e, *vs = ks + TILE * e, *acc = vs + TILE * e;
    float *S = acc + TILE * e, *m = S + TILE * TILE, *l = m + TILE, *corr = l + TILE;
    load_scaled<T>(a, t, i0, rows, qs);
    for (int x = threadIdx.x; x < TILE * e; x += THREADS) acc[x] = 0.f;
    for (int i = threadIdx.x; i < TILE; i += THREADS) { m[i] = -INFINITY; l[i] = 0.f; }
    int lo, hi;
    key_range(a, i0, rows, &lo, &hi);
    for (int j0 = lo; j0 < hi; j0 += TILE) {
        int krows = min(TILE, hi - j0);
        load_key_tile<T>(a, t, j0, krows, ks, vs);
        for (int x = threadIdx.x; x < TILE * TILE; x += THREADS) {
            int i = x / TILE, jj = x % TILE;
            float s = -INFINITY;
            if (i < rows && jj < krows && sees(a, t, i0 + i, j0 + jj)) {
                s = 0.f;
                for (int f = 0; f < e; f++) s += qs[i * e + f] * ks[jj * e + f];
            }
            S[x] = s;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < rows; i += THREADS) {
            float mx = m[i];
            for (int jj = 0; jj < krows; jj++) mx = fmaxf(mx, S[i * TILE + jj]);
            float c = 1.f, sum = 0.f;
            if (mx > -INFINITY) {
                c = expf(m[i] - mx);
                for (int jj = 0; jj < krows; jj++) {
                    float p = expf(S[i * TILE + jj] - mx);
                    S[i * TILE + jj] = p;
                    sum += p;
                }
                m[i] = mx;
            } else {
                for (int jj = 0; jj < krows; jj++) S[i * TILE + jj] = 0.f;
            }
            l[i] = l[i] * c + sum;
            corr[i] = c;
        }
        __syncthreads();
        for (int x = threadIdx.x; x < rows * e; x += THREADS) {
            int i = x / e, f = x % e;
            float s = acc[x] * corr[i];
            for (int jj = 0; jj < krows; jj++) s += S[i * TILE + jj] * vs[jj * e + f];
            acc[x] = s;
        }
        __syncthreads();
    }
    T* out = (T*)a.o0;
    const T* v = (const T*)a.v;
    for (int x = threadIdx.x; x < rows * e; x += THREADS) {
        int i = x / e, f = x % e;
        float o;
        if (l[i] > 0.f) {
            o = acc[x] / l[i];
        } else {
            // Every slot masked: the mean over all slots, pad slots holding -1.
            int real = 0;
            float s = 0.f;
            for (int j = lo; j < hi; j++)
                if (in_slots(a, i0 + i, j)) { s += ld(v[row(a, t, a.n, j, e) + f]); real++; }
            o = (s - (float)(slots(a) - real)) / (float)slots(a);
        }
        out[row(a, t, a.n, i0 + i, e) + f] = st<T>(o);
    }
    for (int i = threadIdx.x; i < rows; i += THREADS)
        a.s0[(long)t * a.n + i0 + i] = l[i] > 0.f ? m[i] + logf(l[i]) : -INFINITY;
}

// Per query row of the tile: its log-sum-exp, and g·out (the softmax backward's row term).
template <typename T>
__device__ __forceinline__ void row_terms(const Args& a, int t, int i0, int rows, float* lse, float* delta) {
    const T *g = (const T*)a.g, *o = (const T*)a.out;
    for (int i = threadIdx.x; i < rows; i += THREADS) {
        long r = row(a, t, a.n, i0 + i, a.e);
        float d = 0.f;
        for (int f = 0; f < a.e; f++) d += ld(g[r + f]) * ld(o[r + f]);
        delta[i] = d;
        lse[i] = a.s0[(long)t * a.n + i0 + i];
    }
}

// grid (ceil(n / TILE), BH): dq.
template <typename T>
__device__ void loc_query_grad(const Args a) {
    SHARED_FLOATS(sm);
    const int t = blockIdx.y, e = a.e, i0 = blockIdx.x * TILE, rows = min(TILE, a.n - i0);
    float *qs = sm, *gs = qs + TILE * e, *ks = gs + TILE * e, *vs = ks + TILE * e, *dq = vs + TILE * e;
    float *S = dq + TILE * e, *lse = S + TILE * TILE, *delta = lse + TILE;
    load_rows<T>(a, a.g, t, a.n, i0, rows, e, gs);
    row_terms<T>(a, t, i0, rows, lse, delta);
    load_scaled<T>(a, t, i0, rows, qs);
    for (int x = threadIdx.x; x < TILE * e; x += THREADS) dq[x] = 0.f;
    int lo, hi;
    key_range(a, i0, rows, &lo, &hi);
    for (int j0 = lo; j0 < hi; j0 += TILE) {
        int krows = min(TILE, hi - j0);
        load_key_tile<T>(a, t, j0, krows, ks, vs);
        for (int x = threadIdx.x; x < TILE * TILE; x += THREADS) {
            int i = x / TILE, jj = x % TILE;
            float ds = 0.f;
            if (i < rows && jj < krows && lse[i] > -INFINITY && sees(a, t, i0 + i, j0 + jj)) {
                float s = 0.f, dp = 0.f;
                for (int f = 0; f < e; f++) {
                    s += qs[i * e + f] * ks[jj * e + f];
                    dp += gs[i * e + f] * vs[jj * e + f];
                }
                ds = expf(s - lse[i]) * (dp - delta[i]);
            }
            S[x] = ds;
        }
        __syncthreads();
        for (int x = threadIdx.x; x < rows * e; x += THREADS) {
            int i = x / e, f = x % e;
            float s = 0.f;
            for (int jj = 0; jj < krows; jj++) s += S[i * TILE + jj] * ks[jj * e + f];
            dq[x] += s;
        }
        __syncthreads();
    }
    const float scale = rsqrtf((float)e);
    T* out = (T*)a.o0;
    for (int x = threadIdx.x; x < rows * e; x += THREADS)
        out[row(a, t, a.n, i0 + x / e, e) + x % e] = st<T>(dq[x] * scale);
}

// grid (ceil(n / TILE), BH): dk and dv, accumulated in registers.
template <typename T>
__device__ void loc_key_grad(const Args a) {
    SHARED_FLOATS(sm);
    const int t = blockIdx.y, e = a.e, j0 = blockIdx.x * TILE, rows = min(TILE, a.n - j0);
    float *ks = sm, *vs = ks + TILE * e, *qs = vs + TILE * e, *gs = qs + TILE * e;
    float *P = gs + TILE * e, *DS = P + TILE * TILE, *lse = DS + TILE * TILE, *delta = lse + TILE;
    load_rows<T>(a, a.k, t, a.n, j0, rows, e, ks);
    load_rows<T>(a, a.v, t, a.n, j0, rows, e, vs);
    float dk[TILE * MAX_DIM / THREADS] = {0.f}, dv[TILE * MAX_DIM / THREADS] = {0.f};
    const float uniform = 1.f / (float)slots(a);
    int lo, hi;
    query_range(a, j0, rows, &lo, &hi);
    for (int i0 = lo; i0 < hi; i0 += TILE) {
        int qrows = min(TILE, hi - i0);
        load_rows<T>(a, a.g, t, a.n, i0, qrows, e, gs);
        row_terms<T>(a, t, i0, qrows, lse, delta);
        load_scaled<T>(a, t, i0, qrows, qs);
        __syncthreads();
        for (int x = threadIdx.x; x < TILE * TILE; x += THREADS) {
            int i = x / TILE, jj = x % TILE;
            float p = 0.f, ds = 0.f;
            if (i < qrows && jj < rows) {
                int qi = i0 + i, j = j0 + jj;
                if (lse[i] == -INFINITY) {
                    p = in_slots(a, qi, j) ? uniform : 0.f;
                } else if (sees(a, t, qi, j)) {
                    float s = 0.f, dp = 0.f;
                    for (int f = 0; f < e; f++) {
                        s += qs[i * e + f] * ks[jj * e + f];
                        dp += gs[i * e + f] * vs[jj * e + f];
                    }
                    p = expf(s - lse[i]);
                    ds = p * (dp - delta[i]);
                }
            }
            P[x] = p;
            DS[x] = ds;
        }
        __syncthreads();
        for (int r = 0, x = threadIdx.x; x < rows * e; r++, x += THREADS) {
            int jj = x / e, f = x % e;
            for (int i = 0; i < qrows; i++) {
                dk[r] += DS[i * TILE + jj] * qs[i * e + f];
                dv[r] += P[i * TILE + jj] * gs[i * e + f];
            }
        }
        __syncthreads();
    }
    T *dko = (T*)a.o1, *dvo = (T*)a.o2;
    for (int r = 0, x = threadIdx.x; x < rows * e; r++, x += THREADS) {
        long at = row(a, t, a.n, j0 + x / e, e) + x % e;
        dko[at] = st<T>(dk[r]);
        dvo[at] = st<T>(dv[r]);
    }
}
