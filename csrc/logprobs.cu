// Paired per-token log-probabilities of policy and prior from logits [N, V]: one block per row, one pass over
// each row of both tensors with 16-byte loads and an online max/sum in float32 (MATH.md, "Per-token quantities
// from one pass"); the backward into the policy logits (optionally in place); masked per-sequence sums.
//
// Conventions: with c = log2(e) / T every logit x is mapped to y = x c (base-2 units), so that
// softmax(x / T) = 2^(y - M) / S. Per row and thread the forward keeps, for the policy, M (running max of y),
// S = sum 2^(y - M), A = sum 2^(y - M) (y - M) (entropy), U = sum 2^(y - M) ((y - M) - (y' - M')) (KL), and for
// the prior M', S'. Then, in natural units,
//   logsumexp = ln2 (M + log2 S),  H = ln2 (log2 S - A / S),  KL(pi || a) = ln2 (U / S - log2 S + log2 S').
// Keeping A and U relative to the running maxima avoids cancelling large logits against the logsumexp.
#include "common.cuh"
#include "fdpg_cuda.h"

namespace fdpg {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kUnroll = 2;  // vectors in flight per thread and tensor

// m, m2: running maxima in base-2 units (x c); r, r2: the same maxima of the raw logits (for the max outputs).
struct FwdState {
    float m, s, a, u, m2, s2, r, r2;
};

__device__ __forceinline__ FwdState fwd_init() {
    return {-kMaxFloat, 0.f, 0.f, 0.f, -kMaxFloat, 0.f, -INFINITY, -INFINITY};
}

// Row r of a [..., V] tensor whose leading dims merge into at most two levels starts at
// (r / t1) * s0 + (r % t1) * s1 elements (a contiguous tensor: s0 = V, s1 = 0, t1 = 1); columns are contiguous.
__device__ __forceinline__ int64_t row_offset(const fdpg_rows& L, int64_t r) {
    return (r / L.t1) * L.s0 + (r % L.t1) * L.s1;
}

// Fold N consecutive elements (policy x, prior q, raw logits as float) into the state.
// -inf logits contribute nothing; NaN or +inf logits make the row's outputs NaN.
template <bool PRIOR, bool ENT, bool KL, int N>
__device__ __forceinline__ void fwd_update(FwdState& st, const float (&x)[N], const float (&q)[N], float c) {
    float t2[N];
    if constexpr (PRIOR) {
        float qr = q[0];
#pragma unroll
        for (int j = 1; j < N; ++j) qr = fmaxf(qr, q[j]);
        if (qr > st.r2) {  // the prior's max grows: (y' - M') shrinks, so U grows by (new - old) S
            const float qm = qr * c;
            if constexpr (KL) {
                if (st.s > 0.f) st.u = fmaf(qm - st.m2, st.s, st.u);
            }
            st.s2 *= ex2(st.m2 - qm);
            st.m2 = qm;
            st.r2 = qr;
        }
#pragma unroll
        for (int j = 0; j < N; ++j) {
            t2[j] = fmaf(q[j], c, -st.m2);
            st.s2 += ex2(t2[j]);
        }
    }
    float xr = x[0];
#pragma unroll
    for (int j = 1; j < N; ++j) xr = fmaxf(xr, x[j]);
    if (xr > st.r) {  // rescale S, A, U to the new max; d < 0
        const float xm = xr * c;
        const float d = st.m - xm;
        const float sc = ex2(d);
        if constexpr (ENT) st.a = sc * fmaf(d, st.s, st.a);
        if constexpr (KL) st.u = sc * fmaf(d, st.s, st.u);
        st.s *= sc;
        st.m = xm;
        st.r = xr;
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float t = fmaf(x[j], c, -st.m);
        const float e = ex2(t);
        st.s += e;
        if constexpr (ENT) st.a = fmaf(e, fmaxf(t, -1e30f), st.a);  // t = -inf has e = 0: contributes 0
        if constexpr (KL) {
            const float d = t - t2[j];
            st.u += (e > 0.f) ? e * d : 0.f;  // pi = 0 contributes 0 whatever the prior; a = 0 < pi gives +inf
        }
    }
}

template <bool PRIOR, bool ENT, bool KL>
__device__ __forceinline__ FwdState fwd_combine(const FwdState& a, const FwdState& b) {
    FwdState r = fwd_init();
    r.m = fmaxf(a.m, b.m);
    r.r = fmaxf(a.r, b.r);
    const float da = a.m - r.m, db = b.m - r.m;
    const float sa = ex2(da), sb = ex2(db);
    r.s = sa * a.s + sb * b.s;
    if constexpr (ENT) r.a = sa * fmaf(da, a.s, a.a) + sb * fmaf(db, b.s, b.a);
    if constexpr (PRIOR) {
        r.m2 = fmaxf(a.m2, b.m2);
        r.r2 = fmaxf(a.r2, b.r2);
        const float qa = a.m2 - r.m2, qb = b.m2 - r.m2;
        r.s2 = ex2(qa) * a.s2 + ex2(qb) * b.s2;
        if constexpr (KL) r.u = sa * fmaf(da - qa, a.s, a.u) + sb * fmaf(db - qb, b.s, b.u);
    }
    return r;
}

template <bool PRIOR, bool ENT, bool KL>
__device__ __forceinline__ FwdState fwd_shfl_xor(const FwdState& s, int mask) {
    FwdState o = fwd_init();
    o.m = __shfl_xor_sync(0xffffffffu, s.m, mask);
    o.s = __shfl_xor_sync(0xffffffffu, s.s, mask);
    o.r = __shfl_xor_sync(0xffffffffu, s.r, mask);
    if constexpr (ENT) o.a = __shfl_xor_sync(0xffffffffu, s.a, mask);
    if constexpr (KL) o.u = __shfl_xor_sync(0xffffffffu, s.u, mask);
    if constexpr (PRIOR) {
        o.m2 = __shfl_xor_sync(0xffffffffu, s.m2, mask);
        o.s2 = __shfl_xor_sync(0xffffffffu, s.s2, mask);
        o.r2 = __shfl_xor_sync(0xffffffffu, s.r2, mask);
    }
    return o;
}

// Reduce over the block (blockDim.x a multiple of 32); the result is valid in thread 0.
template <bool PRIOR, bool ENT, bool KL>
__device__ __forceinline__ FwdState fwd_block_reduce(FwdState st, FwdState* smem) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) st = fwd_combine<PRIOR, ENT, KL>(st, fwd_shfl_xor<PRIOR, ENT, KL>(st, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    if (lane == 0) smem[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < nwarps ? smem[lane] : fwd_init();
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) st = fwd_combine<PRIOR, ENT, KL>(st, fwd_shfl_xor<PRIOR, ENT, KL>(st, o));
    }
    return st;
}

struct FwdArgs {
    const void* policy;
    const void* prior;
    fdpg_rows policy_rows, prior_rows;
    const int64_t* targets;
    int64_t rows, vocab;
    float c, tau;  // log2(e) / temperature, temperature
    float *lp, *lse, *mx, *qlp, *qlse, *qmx, *ent, *kl;
};

// Elements [0, head) and [body_end, V) of a row are read one at a time; [head, body_end) as 16-byte vectors of
// the policy (the prior's matching vectors are 8, 16 or 32 bytes). head aligns the policy row to 16 bytes; a row
// whose prior (or output) is not aligned at the same element is read entirely one element at a time.
template <class KP, class KQ, bool PRIOR, bool ENT, bool KL>
__global__ void __launch_bounds__(kMaxThreads) paired_fwd_kernel(const FwdArgs args) {
    using RP = typename KP::raw;
    using RQ = typename KQ::raw;
    constexpr int VEC = 16 / sizeof(RP);
    constexpr int QBYTES = VEC * sizeof(RQ);
    constexpr unsigned QALIGN = QBYTES < 16 ? QBYTES : 16;
    __shared__ FwdState smem[32];

    const int64_t V = args.vocab;
    const float c = args.c;
    for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
        const RP* x = static_cast<const RP*>(args.policy) + row_offset(args.policy_rows, row);
        const RQ* q = PRIOR ? static_cast<const RQ*>(args.prior) + row_offset(args.prior_rows, row) : nullptr;

        int64_t head = static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(x) & 15u)) & 15u) / sizeof(RP));
        bool vec = (reinterpret_cast<uintptr_t>(x) % sizeof(RP)) == 0;
        if constexpr (PRIOR) vec = vec && (reinterpret_cast<uintptr_t>(q + head) % QALIGN) == 0;
        if (!vec || head > V) head = V;
        const int64_t nvec = (V - head) / VEC;
        const int64_t body_end = head + nvec * VEC;

        FwdState st = fwd_init();
        for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
            const float xs[1] = {KP::load(x[i])};
            float qs[1] = {0.f};
            if constexpr (PRIOR) qs[0] = KQ::load(q[i]);
            fwd_update<PRIOR, ENT, KL, 1>(st, xs, qs, c);
        }
        for (int64_t i = body_end + threadIdx.x; i < V; i += blockDim.x) {
            const float xs[1] = {KP::load(x[i])};
            float qs[1] = {0.f};
            if constexpr (PRIOR) qs[0] = KQ::load(q[i]);
            fwd_update<PRIOR, ENT, KL, 1>(st, xs, qs, c);
        }

        const RP* xb = x + head;
        const RQ* qb = PRIOR ? q + head : nullptr;
        const int64_t stride = blockDim.x;
        int64_t k = threadIdx.x;
        for (; k + (kUnroll - 1) * stride < nvec; k += kUnroll * stride) {
            float xv[kUnroll][VEC], qv[kUnroll][VEC];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                load_vec<KP, VEC>(xb + (k + u * stride) * VEC, xv[u]);
                if constexpr (PRIOR) load_vec<KQ, VEC>(qb + (k + u * stride) * VEC, qv[u]);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) fwd_update<PRIOR, ENT, KL, VEC>(st, xv[u], qv[u], c);
        }
        for (; k < nvec; k += stride) {
            float xv[VEC], qv[VEC];
            load_vec<KP, VEC>(xb + k * VEC, xv);
            if constexpr (PRIOR) load_vec<KQ, VEC>(qb + k * VEC, qv);
            fwd_update<PRIOR, ENT, KL, VEC>(st, xv, qv, c);
        }

        st = fwd_block_reduce<PRIOR, ENT, KL>(st, smem);
        if (threadIdx.x == 0) {
            const int64_t t = args.targets[row];
            const bool ok = t >= 0 && t < V;
            const float log2s = log2f(st.s);
            args.lse[row] = kLn2 * (st.m + log2s);
            args.mx[row] = st.r / args.tau;
            args.lp[row] = ok ? kLn2 * (fmaf(KP::load(x[ok ? t : 0]), c, -st.m) - log2s) : __int_as_float(0x7fc00000);
            if constexpr (ENT) args.ent[row] = kLn2 * (log2s - st.a / st.s);
            if constexpr (PRIOR) {
                const float log2s2 = log2f(st.s2);
                args.qlse[row] = kLn2 * (st.m2 + log2s2);
                args.qmx[row] = st.r2 / args.tau;
                args.qlp[row] = ok ? kLn2 * (fmaf(KQ::load(q[ok ? t : 0]), c, -st.m2) - log2s2)
                                   : __int_as_float(0x7fc00000);
                if constexpr (KL) args.kl[row] = kLn2 * (st.u / st.s - log2s + log2s2);
            }
        }
        __syncthreads();  // smem is reused by the next row
    }
}

int threads_for(int64_t vocab, int vec) {
    const int64_t nvec = (vocab + vec - 1) / vec;
    int threads = 32;
    while (threads < kMaxThreads && 2 * threads <= nvec) threads *= 2;
    return threads;
}

template <class KP, class KQ, bool PRIOR, bool ENT, bool KL>
cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream) {
    const int threads = threads_for(a.vocab, 16 / sizeof(typename KP::raw));
    paired_fwd_kernel<KP, KQ, PRIOR, ENT, KL><<<rows_grid(a.rows), threads, 0, stream>>>(a);
    return cudaGetLastError();
}

// ---- backward ------------------------------------------------------------------------------------------------

struct BwdArgs {
    const void* policy;
    const void* prior;
    void* out;
    fdpg_rows policy_rows, prior_rows, out_rows;
    const int64_t* targets;
    const float *lse, *qlse, *g_lp, *g_lse, *g_ent, *g_kl, *ent, *kl;
    int64_t rows, vocab;
    float c, inv_tau;
};

// Per row: L2, Lq2 = logsumexp of policy and prior in base-2 units; g = g_lp; w0 = g_lse - g_lp (the
// coefficient of p common to every column); gh, H, gk, K for entropy and KL; t the target column.
struct BwdRow {
    float L2, Lq2, g, w0, gh, H, gk, K;
    int64_t t;
};

template <bool ENT, bool KL, int N>
__device__ __forceinline__ void bwd_chunk(const BwdRow& r, float c, float inv_tau, int64_t j0, const float (&x)[N],
                                          const float (&q)[N], float (&out)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const float y = fmaf(x[i], c, -r.L2);  // log2 p
        const float p = ex2(y);
        float w = r.w0;
        if constexpr (ENT) w = fmaf(-r.gh, fmaf(y, kLn2, r.H), w);  // -g_H (log p + H)
        if constexpr (KL) {
            const float ya = fmaf(q[i], c, -r.Lq2);  // log2 a
            w = fmaf(r.gk, fmaf(y - ya, kLn2, -r.K), w);  // g_KL (log p - log a - KL)
        }
        float gz;
        if constexpr (ENT || KL) gz = (p > 0.f) ? p * w : 0.f;  // p = 0 (a -inf logit): log p = -inf, term 0
        else gz = p * w;
        if (j0 + i == r.t) gz += r.g;
        out[i] = gz * inv_tau;
    }
}

template <class KP, class KQ, bool ENT, bool KL>
__global__ void __launch_bounds__(kMaxThreads) paired_bwd_kernel(const BwdArgs args) {
    using RP = typename KP::raw;
    using RQ = typename KQ::raw;
    constexpr int VEC = 16 / sizeof(RP);
    constexpr int QBYTES = VEC * sizeof(RQ);
    constexpr unsigned QALIGN = QBYTES < 16 ? QBYTES : 16;

    const int64_t V = args.vocab;
    const float c = args.c, inv_tau = args.inv_tau;
    for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
        // Not __restrict__: out may be the policy buffer (in place); each element is read before it is written,
        // by the same thread.
        const RP* x = static_cast<const RP*>(args.policy) + row_offset(args.policy_rows, row);
        RP* o = static_cast<RP*>(args.out) + row_offset(args.out_rows, row);
        const RQ* q = KL ? static_cast<const RQ*>(args.prior) + row_offset(args.prior_rows, row) : nullptr;

        BwdRow r;
        r.L2 = args.lse[row] * kLog2e;
        r.g = args.g_lp ? args.g_lp[row] : 0.f;
        r.w0 = (args.g_lse ? args.g_lse[row] : 0.f) - r.g;
        r.gh = ENT ? args.g_ent[row] : 0.f;
        r.H = ENT ? args.ent[row] : 0.f;
        r.gk = KL ? args.g_kl[row] : 0.f;
        r.K = KL ? args.kl[row] : 0.f;
        r.Lq2 = KL ? args.qlse[row] * kLog2e : 0.f;
        r.t = args.targets[row];

        int64_t head = static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(x) & 15u)) & 15u) / sizeof(RP));
        bool vec = (reinterpret_cast<uintptr_t>(x) % sizeof(RP)) == 0 &&
                   (reinterpret_cast<uintptr_t>(o + head) & 15u) == 0;
        if constexpr (KL) vec = vec && (reinterpret_cast<uintptr_t>(q + head) % QALIGN) == 0;
        if (!vec || head > V) head = V;
        const int64_t nvec = (V - head) / VEC;
        const int64_t body_end = head + nvec * VEC;

        for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
            const float xs[1] = {KP::load(x[i])};
            float qs[1] = {0.f}, gs[1];
            if constexpr (KL) qs[0] = KQ::load(q[i]);
            bwd_chunk<ENT, KL, 1>(r, c, inv_tau, i, xs, qs, gs);
            o[i] = KP::store(gs[0]);
        }
        for (int64_t i = body_end + threadIdx.x; i < V; i += blockDim.x) {
            const float xs[1] = {KP::load(x[i])};
            float qs[1] = {0.f}, gs[1];
            if constexpr (KL) qs[0] = KQ::load(q[i]);
            bwd_chunk<ENT, KL, 1>(r, c, inv_tau, i, xs, qs, gs);
            o[i] = KP::store(gs[0]);
        }

        const RP* xb = x + head;
        RP* ob = o + head;
        const RQ* qb = KL ? q + head : nullptr;
        const int64_t stride = blockDim.x;
        int64_t k = threadIdx.x;
        for (; k + (kUnroll - 1) * stride < nvec; k += kUnroll * stride) {
            float xv[kUnroll][VEC], qv[kUnroll][VEC];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                load_vec<KP, VEC>(xb + (k + u * stride) * VEC, xv[u]);
                if constexpr (KL) load_vec<KQ, VEC>(qb + (k + u * stride) * VEC, qv[u]);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                float gv[VEC];
                bwd_chunk<ENT, KL, VEC>(r, c, inv_tau, head + (k + u * stride) * VEC, xv[u], qv[u], gv);
                store_vec<KP, VEC>(ob + (k + u * stride) * VEC, gv);
            }
        }
        for (; k < nvec; k += stride) {
            float xv[VEC], qv[VEC], gv[VEC];
            load_vec<KP, VEC>(xb + k * VEC, xv);
            if constexpr (KL) load_vec<KQ, VEC>(qb + k * VEC, qv);
            bwd_chunk<ENT, KL, VEC>(r, c, inv_tau, head + k * VEC, xv, qv, gv);
            store_vec<KP, VEC>(ob + k * VEC, gv);
        }
    }
}

template <class KP, class KQ, bool ENT, bool KL>
cudaError_t launch_bwd(const BwdArgs& a, cudaStream_t stream) {
    const int threads = threads_for(a.vocab, 16 / sizeof(typename KP::raw));
    paired_bwd_kernel<KP, KQ, ENT, KL><<<rows_grid(a.rows), threads, 0, stream>>>(a);
    return cudaGetLastError();
}

// ---- masked per-sequence sums --------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T block_sum(T acc, T* smem) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    __syncthreads();  // smem may still be read from the previous sum
    if (lane == 0) smem[warp] = acc;
    __syncthreads();
    acc = T(0);
    for (int w = 0; w < nwarps; ++w) acc += smem[w];
    return acc;
}

// out[b] = sum_t mask[b, t] ? v[b, t] : 0, and the same of v2 (may be NULL) into out2, one block per row.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
masked_row_sums_kernel(const T* __restrict__ v, const T* __restrict__ v2, const uint8_t* __restrict__ mask,
                       int64_t rows, int64_t cols, T* __restrict__ out, T* __restrict__ out2) {
    __shared__ T smem[32];
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        T acc = T(0), acc2 = T(0);
        for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
            const int64_t j = row * cols + i;
            if (mask[j]) {  // masked positions count 0 even where v is -inf or NaN
                acc += v[j];
                if (v2 != nullptr) acc2 += v2[j];
            }
        }
        acc = block_sum(acc, smem);
        if (threadIdx.x == 0) out[row] = acc;
        if (v2 != nullptr) {
            acc2 = block_sum(acc2, smem);
            if (threadIdx.x == 0) out2[row] = acc2;
        }
    }
}

}  // namespace
}  // namespace fdpg

using namespace fdpg;

extern "C" cudaError_t fdpg_paired_logprobs_fwd(int policy_dtype, int prior_dtype, const void* policy,
                                                fdpg_rows policy_rows, const void* prior, fdpg_rows prior_rows,
                                                const int64_t* targets, int64_t rows, int64_t vocab,
                                                float temperature, int with_entropy, int with_kl, float* policy_lp,
                                                float* policy_lse, float* policy_max, float* prior_lp,
                                                float* prior_lse, float* prior_max, float* entropy, float* kl,
                                                cudaStream_t stream) {
    if (rows < 0 || vocab <= 0 || !(temperature > 0.f)) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;  // nothing to launch (and an empty tensor's data pointer is NULL)
    if ((with_kl && prior == nullptr) || policy_rows.t1 < 1 || prior_rows.t1 < 1) return cudaErrorInvalidValue;
    const FwdArgs a{policy, prior, policy_rows, prior_rows, targets, rows, vocab, kLog2e / temperature, temperature,
                    policy_lp, policy_lse, policy_max, prior_lp, prior_lse, prior_max, entropy, kl};
    return dispatch_dtype(policy_dtype, [&](auto kp) -> cudaError_t {
        using KP = decltype(kp);
        if (prior == nullptr) {
            return with_entropy ? launch_fwd<KP, KP, false, true, false>(a, stream)
                                : launch_fwd<KP, KP, false, false, false>(a, stream);
        }
        return dispatch_dtype(prior_dtype, [&](auto kq) -> cudaError_t {
            using KQ = decltype(kq);
            if (with_kl) {
                return with_entropy ? launch_fwd<KP, KQ, true, true, true>(a, stream)
                                    : launch_fwd<KP, KQ, true, false, true>(a, stream);
            }
            return with_entropy ? launch_fwd<KP, KQ, true, true, false>(a, stream)
                                : launch_fwd<KP, KQ, true, false, false>(a, stream);
        });
    });
}

extern "C" cudaError_t fdpg_paired_logprobs_bwd(int policy_dtype, int prior_dtype, const void* policy,
                                                fdpg_rows policy_rows, const void* prior, fdpg_rows prior_rows,
                                                void* grad_out, fdpg_rows out_rows, const int64_t* targets,
                                                const float* policy_lse, const float* prior_lse,
                                                const float* grad_lp, const float* grad_lse,
                                                const float* grad_entropy, const float* grad_kl,
                                                const float* entropy, const float* kl, int64_t rows, int64_t vocab,
                                                float temperature, cudaStream_t stream) {
    const bool ent = grad_entropy != nullptr, with_kl = grad_kl != nullptr;
    if (rows < 0 || vocab <= 0 || !(temperature > 0.f)) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;  // nothing to launch (and an empty tensor's data pointer is NULL)
    if ((ent && entropy == nullptr) || (with_kl && (prior == nullptr || prior_lse == nullptr || kl == nullptr)) ||
        policy_rows.t1 < 1 || prior_rows.t1 < 1 || out_rows.t1 < 1)
        return cudaErrorInvalidValue;
    const BwdArgs a{policy, prior, grad_out, policy_rows, prior_rows, out_rows, targets, policy_lse, prior_lse,
                    grad_lp, grad_lse, grad_entropy, grad_kl, entropy, kl, rows, vocab, kLog2e / temperature,
                    1.f / temperature};
    return dispatch_dtype(policy_dtype, [&](auto kp) -> cudaError_t {
        using KP = decltype(kp);
        if (!with_kl) {
            return ent ? launch_bwd<KP, KP, true, false>(a, stream) : launch_bwd<KP, KP, false, false>(a, stream);
        }
        return dispatch_dtype(prior_dtype, [&](auto kq) -> cudaError_t {
            using KQ = decltype(kq);
            return ent ? launch_bwd<KP, KQ, true, true>(a, stream) : launch_bwd<KP, KQ, false, true>(a, stream);
        });
    });
}

extern "C" cudaError_t fdpg_masked_row_sums(int dtype, const void* values, const void* values2, const uint8_t* mask,
                                            int64_t rows, int64_t cols, void* out, void* out2, cudaStream_t stream) {
    if (rows < 0 || cols < 0 || (values2 != nullptr && out2 == nullptr)) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    int threads = 32;
    while (threads < kMaxThreads && 2 * threads <= cols) threads *= 2;
    if (dtype == kF32) {
        masked_row_sums_kernel<float><<<rows_grid(rows), threads, 0, stream>>>(
            static_cast<const float*>(values), static_cast<const float*>(values2), mask, rows, cols,
            static_cast<float*>(out), static_cast<float*>(out2));
    } else if (dtype == 3) {
        masked_row_sums_kernel<double><<<rows_grid(rows), threads, 0, stream>>>(
            static_cast<const double*>(values), static_cast<const double*>(values2), mask, rows, cols,
            static_cast<double*>(out), static_cast<double*>(out2));
    } else {
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}
