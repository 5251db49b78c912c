// Causal linear attention, chunk-parallel (see causal_linear.rs for the math and the CPU kernel).
//
// The sequence is cut into chunks of CHUNK positions. Per chunk c, with lm[c] the largest kept
// key in it and mu[c] = max(0, lm[0..c)) the running maximum before it:
//   1. chunk_sums:  L[c] = Σ_{j∈c} exp(k_j - lm[c]) v_jᵀ  and  Σ exp(k_j - lm[c])
//   2. prefix:      P[c] = Σ_{c'<c} L[c'] at scale mu[c]            (in place over L)
//   3. forward:     queries of chunk c read P[pc] (pc = c, or the first chunk of their bucket
//                   when a bucket spans chunks) and, when buckets are shorter than a chunk, the
//                   visible keys of their own chunk, everything at the chunk's scale sigma.
// The backward pass reruns 1 and 2, sums the query side of each chunk (query_sums), carries it
// backwards over the chunks (suffix) and finishes every gradient chunk by chunk (backward).
//
// Scratch: s0 = states [BH][nc][e*ev + e], s1 = lm [BH][nc], s2 = mu [BH][nc + 1],
//          s3 = unclamped denominators [BH][n], s4 = query-side states [BH][nc][e*ev + e].

__device__ __forceinline__ bool intra_chunk(const Args& a) { return a.bucket < CHUNK; }

// The chunk whose prefix state queries of chunk c read.
__device__ __forceinline__ int prefix_chunk(const Args& a, int c) {
    if (intra_chunk(a)) return c;
    int per = a.bucket / CHUNK;
    return c / per * per;
}

// The scale of the queries of chunk c.
__device__ __forceinline__ float query_scale(const Args& a, const float* mu, int c) {
    return intra_chunk(a) ? mu[c + 1] : mu[prefix_chunk(a, c)];
}

__device__ __forceinline__ bool visible(int i, int j, int bucket) {
    return bucket == 1 ? j <= i : j / bucket < i / bucket;
}

__device__ __forceinline__ float denominator_floor(float sigma) {
    return fmaxf(EPS * expf(-sigma), FLT_TINY);
}

// out = [aᵀb (e x ev), aᵀw (e)] over `rows` rows of a (rows x e) and b (rows x ev) in shared
// memory; w null means ones.
__device__ __forceinline__ void state_sums(const float* a, const float* b, const float* w, int rows, int e, int ev, float* out) {
    for (int x = threadIdx.x; x < e * ev + e; x += THREADS) {
        float acc = 0.f;
        if (x < e * ev) {
            int f = x / ev, col = x % ev;
            for (int j = 0; j < rows; j++) acc += a[j * e + f] * b[j * ev + col];
        } else {
            for (int j = 0; j < rows; j++) acc += a[j * e + x - e * ev] * (w ? w[j] : 1.f);
        }
        out[x] = acc;
    }
}

template <typename T>
__device__ void cla_chunk_sums(const Args a) {
    SHARED_FLOATS(sm);
    const int c = blockIdx.x, t = blockIdx.y, e = a.e, ev = a.ev, nc = a.nc;
    const int i0 = c * CHUNK, rows = min(CHUNK, a.n - i0), sz = e * ev + e;
    float *kh = sm, *vv = kh + CHUNK * e, *red = vv + CHUNK * ev;
    load_rows<T>(a, a.k, t, a.n, i0, rows, e, kh);
    load_rows<T>(a, a.v, t, a.n, i0, rows, ev, vv);
    __syncthreads();
    float mx = -INFINITY;
    for (int x = threadIdx.x; x < rows * e; x += THREADS)
        if (kept(a, t, a.n, i0 + x / e)) mx = fmaxf(mx, kh[x]);
    const float lm = block_max(mx, red);
    for (int x = threadIdx.x; x < CHUNK * e; x += THREADS) {
        int j = x / e;
        kh[x] = (j < rows && lm > -INFINITY && kept(a, t, a.n, i0 + j)) ? expf(kh[x] - lm) : 0.f;
    }
    __syncthreads();
    state_sums(kh, vv, nullptr, rows, e, ev, a.s0 + ((long)t * nc + c) * sz);
    if (threadIdx.x == 0) a.s1[(long)t * nc + c] = lm;
}

// grid (ceil(sz / THREADS), BH): each thread carries one entry of the state along the chunks.
template <typename T>
__device__ void cla_prefix(const Args a) {
    const int t = blockIdx.y, nc = a.nc, sz = a.e * a.ev + a.e;
    const int x = blockIdx.x * THREADS + threadIdx.x;
    const float* lm = a.s1 + (long)t * nc;
    float* st = a.s0 + (long)t * nc * sz;
    float run = 0.f, mu = 0.f;
    for (int c = 0; c < nc; c++) {
        if (x == 0) a.s2[(long)t * (nc + 1) + c] = mu;
        float l = x < sz ? st[(long)c * sz + x] : 0.f;
        if (x < sz) st[(long)c * sz + x] = run;
        if (lm[c] > -INFINITY) {
            float next = fmaxf(mu, lm[c]);
            run = run * expf(mu - next) + l * expf(lm[c] - next);
            mu = next;
        }
    }
    if (x == 0) a.s2[(long)t * (nc + 1) + nc] = mu;
}

template <typename T>
__device__ void cla_forward(const Args a) {
    SHARED_FLOATS(sm);
    const int c = blockIdx.x, t = blockIdx.y, e = a.e, ev = a.ev, nc = a.nc;
    const int i0 = c * CHUNK, rows = min(CHUNK, a.n - i0), sz = e * ev + e;
    const bool intra = intra_chunk(a);
    const float* mu = a.s2 + (long)t * (nc + 1);
    const int pc = prefix_chunk(a, c);
    const float sigma = query_scale(a, mu, c), inter = expf(mu[pc] - sigma);
    const float* P = a.s0 + ((long)t * nc + pc) * sz;
    float *qh = sm, *kh = qh + CHUNK * e, *vv = kh + CHUNK * e, *A = vv + CHUNK * ev, *den = A + CHUNK * CHUNK;
    load_rows<T>(a, a.q, t, a.n, i0, rows, e, qh);
    if (intra) {
        load_rows<T>(a, a.k, t, a.n, i0, rows, e, kh);
        load_rows<T>(a, a.v, t, a.n, i0, rows, ev, vv);
    }
    __syncthreads();
    softmax_rows(qh, rows, e, rsqrtf((float)e));
    for (int x = threadIdx.x; x < rows * e && intra; x += THREADS)
        kh[x] = kept(a, t, a.n, i0 + x / e) ? expf(kh[x] - sigma) : 0.f;
    __syncthreads();
    for (int x = threadIdx.x; x < CHUNK * CHUNK; x += THREADS) {
        int i = x / CHUNK, j = x % CHUNK;
        float s = 0.f;
        if (intra && i < rows && j < rows && visible(i, j, a.bucket))
            for (int f = 0; f < e; f++) s += qh[i * e + f] * kh[j * e + f];
        A[x] = s;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows; i += THREADS) {
        float d = 0.f;
        for (int f = 0; f < e; f++) d += qh[i * e + f] * P[e * ev + f];
        d *= inter;
        for (int j = 0; j < rows && intra; j++) d += A[i * CHUNK + j];
        den[i] = d;
        a.s3[(long)t * a.n + i0 + i] = d;
    }
    __syncthreads();
    const float floor = denominator_floor(sigma);
    T* out = (T*)a.o0;
    for (int x = threadIdx.x; x < rows * ev; x += THREADS) {
        int i = x / ev, col = x % ev;
        float acc = 0.f;
        for (int f = 0; f < e; f++) acc += qh[i * e + f] * P[f * ev + col];
        acc *= inter;
        for (int j = 0; j < rows && intra; j++) acc += A[i * CHUNK + j] * vv[j * ev + col];
        out[row(a, t, a.n, i0 + i, ev) + col] = st<T>(acc / fmaxf(den[i], floor));
    }
}

// Gradients with respect to the numerator (gn, rows x ev) and the denominator (gd) of the
// queries of chunk c, both at the chunk's scale.
template <typename T>
__device__ __forceinline__ void output_grads(const Args& a, int t, int i0, int rows, float sigma, float* gn, float* gd) {
    const int ev = a.ev;
    const T *g = (const T*)a.g, *o = (const T*)a.out;
    const float floor = denominator_floor(sigma);
    for (int i = threadIdx.x; i < rows; i += THREADS) {
        float den = a.s3[(long)t * a.n + i0 + i], dp = fmaxf(den, floor), dot = 0.f;
        long r = row(a, t, a.n, i0 + i, ev);
        for (int col = 0; col < ev; col++) {
            float gi = ld(g[r + col]);
            gn[i * ev + col] = gi / dp;
            dot += gi * ld(o[r + col]);
        }
        gd[i] = den > floor ? -dot / dp : 0.f;
    }
}

template <typename T>
__device__ void cla_query_sums(const Args a) {
    SHARED_FLOATS(sm);
    const int c = blockIdx.x, t = blockIdx.y, e = a.e, ev = a.ev, nc = a.nc;
    const int i0 = c * CHUNK, rows = min(CHUNK, a.n - i0), sz = e * ev + e;
    const float sigma = query_scale(a, a.s2 + (long)t * (nc + 1), c);
    float *qh = sm, *gn = qh + CHUNK * e, *gd = gn + CHUNK * ev;
    load_rows<T>(a, a.q, t, a.n, i0, rows, e, qh);
    __syncthreads();
    softmax_rows(qh, rows, e, rsqrtf((float)e));
    output_grads<T>(a, t, i0, rows, sigma, gn, gd);
    __syncthreads();
    state_sums(qh, gn, gd, rows, e, ev, a.s4 + ((long)t * nc + c) * sz);
}

// grid (ceil(sz / THREADS), BH). Walks the chunks backwards, replacing each chunk's query sums
// with the sum over the query chunks that see its keys, at the key chunk's scale mu[c + 1].
// Chunks that share a prefix chunk also share their scale and are added together.
template <typename T>
__device__ void cla_suffix(const Args a) {
    const int t = blockIdx.y, nc = a.nc, sz = a.e * a.ev + a.e;
    const int x = blockIdx.x * THREADS + threadIdx.x;
    if (x >= sz) return;
    const float* mu = a.s2 + (long)t * (nc + 1);
    float* st = a.s4 + (long)t * nc * sz;
    float run = 0.f, scale = mu[nc], pending = 0.f, pending_sigma = 0.f;
    int pending_pc = -1;
    for (int c = nc - 1; c >= 0; c--) {
        float target = mu[c + 1];
        run *= expf(target - scale);
        scale = target;
        if (pending_pc == c + 1) {
            run += pending * expf(target - pending_sigma);
            pending = 0.f;
            pending_pc = -1;
        }
        float own = st[(long)c * sz + x];
        if (pending_pc < 0) {
            pending_pc = prefix_chunk(a, c);
            pending_sigma = query_scale(a, mu, c);
        }
        pending += own;
        st[(long)c * sz + x] = run;
    }
}

template <typename T>
__device__ void cla_backward(const Args a) {
    SHARED_FLOATS(sm);
    const int c = blockIdx.x, t = blockIdx.y, e = a.e, ev = a.ev, nc = a.nc;
    const int d = max(e, ev);
    const int i0 = c * CHUNK, rows = min(CHUNK, a.n - i0), sz = e * ev + e;
    const bool intra = intra_chunk(a);
    const float* mu = a.s2 + (long)t * (nc + 1);
    const int pc = prefix_chunk(a, c);
    const float sigma = query_scale(a, mu, c), key_scale = mu[c + 1], inter = expf(mu[pc] - sigma);
    const float* P = a.s0 + ((long)t * nc + pc) * sz;
    const float* Q = a.s4 + ((long)t * nc + c) * sz;
    float *qh = sm, *kh = qh + CHUNK * d, *vv = kh + CHUNK * d, *gn = vv + CHUNK * d;
    float *D = gn + CHUNK * d, *A = D + CHUNK * CHUNK, *gd = A + CHUNK * CHUNK;
    load_rows<T>(a, a.q, t, a.n, i0, rows, e, qh);
    load_rows<T>(a, a.k, t, a.n, i0, rows, e, kh);
    load_rows<T>(a, a.v, t, a.n, i0, rows, ev, vv);
    __syncthreads();
    const float scale = rsqrtf((float)e);
    softmax_rows(qh, rows, e, scale);
    output_grads<T>(a, t, i0, rows, sigma, gn, gd);
    for (int x = threadIdx.x; x < rows * e; x += THREADS)
        kh[x] = kept(a, t, a.n, i0 + x / e) ? expf(kh[x] - key_scale) : 0.f;
    for (int x = threadIdx.x; x < rows * ev; x += THREADS)
        if (!kept(a, t, a.n, i0 + x / ev)) vv[x] = 0.f;
    __syncthreads();
    // Pairs inside the chunk: D = dL/d(weight), A = weight.
    for (int x = threadIdx.x; x < CHUNK * CHUNK; x += THREADS) {
        int i = x / CHUNK, j = x % CHUNK;
        float dsum = 0.f, w = 0.f;
        if (intra && i < rows && j < rows && visible(i, j, a.bucket)) {
            for (int col = 0; col < ev; col++) dsum += vv[j * ev + col] * gn[i * ev + col];
            dsum += gd[i];
            for (int f = 0; f < e; f++) w += qh[i * e + f] * kh[j * e + f];
        }
        D[x] = dsum;
        A[x] = w;
    }
    __syncthreads();
    T *dq = (T*)a.o0, *dk = (T*)a.o1, *dv = (T*)a.o2;
    for (int x = threadIdx.x; x < rows * e; x += THREADS) {
        int j = x / e, f = x % e;
        float acc = Q[e * ev + f];
        for (int col = 0; col < ev; col++) acc += Q[f * ev + col] * vv[j * ev + col];
        for (int i = 0; i < rows && intra; i++) acc += qh[i * e + f] * D[i * CHUNK + j];
        dk[row(a, t, a.n, i0 + j, e) + f] = st<T>(acc * kh[x]);
    }
    for (int x = threadIdx.x; x < rows * ev; x += THREADS) {
        int j = x / ev, col = x % ev;
        float acc = 0.f;
        if (kept(a, t, a.n, i0 + j)) {
            for (int f = 0; f < e; f++) acc += kh[j * e + f] * Q[f * ev + col];
            for (int i = 0; i < rows && intra; i++) acc += A[i * CHUNK + j] * gn[i * ev + col];
        }
        dv[row(a, t, a.n, i0 + j, ev) + col] = st<T>(acc);
    }
    __syncthreads();
    float* dqh = vv;  // values are no longer needed
    for (int x = threadIdx.x; x < rows * e; x += THREADS) {
        int i = x / e, f = x % e;
        float acc = P[e * ev + f] * gd[i];
        for (int col = 0; col < ev; col++) acc += P[f * ev + col] * gn[i * ev + col];
        acc *= inter;
        for (int j = 0; j < rows && intra; j++) acc += D[i * CHUNK + j] * kh[j * e + f];
        dqh[x] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows; i += THREADS) {
        float dot = 0.f;
        for (int f = 0; f < e; f++) dot += qh[i * e + f] * dqh[i * e + f];
        gd[i] = dot / scale;
    }
    __syncthreads();
    for (int x = threadIdx.x; x < rows * e; x += THREADS) {
        int i = x / e;
        dq[row(a, t, a.n, i0 + i, e) + x % e] = st<T>(qh[x] * (dqh[x] - gd[i]));
    }
}
