// f-DPG sequence coefficients and importance-sampling estimates for a batch of N sequences in one launch: one
// block loops over N (tens of thousands of sequences take a few passes of a few microseconds each) with block
// reductions in float64, whatever the input dtype. Semantics are those of fdpg.reference.fdpg_coefficients and
// fdpg.reference.divergence_estimates; f' of a built-in divergence is sum_k c_k exp(a_k s) + rest(s) with the
// importance weight folded into every exponent (fdpg/divergences.py, Divergence.weighted_f_prime).
#include <math.h>

#include "common.cuh"
#include "fdpg_cuda.h"

namespace fdpg {
namespace {

constexpr int kThreads = 1024;
constexpr double kLog2d = 0.69314718055994530942;

// Online logsumexp: (m, s) with value m + log(s). -inf terms are skipped; NaN terms make it NaN.
struct Lse {
    double m, s;
    __device__ __forceinline__ void add(double x) {
        if (x == -INFINITY) return;
        if (x > m) {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s += exp(x - m);
        }
    }
    __device__ __forceinline__ void merge(double m2, double s2) {
        const double mm = fmax(m, m2);
        if (mm == -INFINITY) {
            m = mm;
            s = 0.0;
            return;
        }
        s = s * exp(m - mm) + s2 * exp(m2 - mm);
        m = mm;
    }
    __device__ __forceinline__ double value() const { return m + log(s); }
};

// Sum over the block of K doubles per thread; every thread gets the totals. smem holds 32 * K doubles.
template <int K>
__device__ __forceinline__ void block_sum(double (&v)[K], double* smem) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    __syncthreads();  // smem may still be read from a previous reduction
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < K; ++k) smem[warp * K + k] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
        double t = 0.0;
        for (int w = 0; w < nwarps; ++w) t += smem[w * K + k];
        v[k] = t;
    }
}

// Logsumexp over the block of K online accumulators per thread; every thread gets the totals.
template <int K>
__device__ __forceinline__ void block_lse(Lse (&v)[K], double* smem) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const double m2 = __shfl_xor_sync(0xffffffffu, v[k].m, o);
            const double s2 = __shfl_xor_sync(0xffffffffu, v[k].s, o);
            v[k].merge(m2, s2);
        }
    __syncthreads();
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < K; ++k) {
            smem[(warp * K + k) * 2] = v[k].m;
            smem[(warp * K + k) * 2 + 1] = v[k].s;
        }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
        Lse t{-INFINITY, 0.0};
        for (int w = 0; w < nwarps; ++w) t.merge(smem[(w * K + k) * 2], smem[(w * K + k) * 2 + 1]);
        v[k] = t;
    }
}

__device__ __forceinline__ double softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

__device__ __forceinline__ double sign(double x) { return isnan(x) ? x : (x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0)); }

// exp(log_w) (f'(t) - shift) at s = log t (fdpg.divergences.Divergence.weighted_f_prime, term for term): the shift
// (the baseline) is taken from f''s non-exponential part before the weight multiplies it, as
// sign(r) exp(log_w + log|r|) where exp(log_w) r would overflow or underflow on the way.
// The part of f'(s) that is not an exponential of s.
__device__ __forceinline__ double rest_value(const fdpg_divergence& d, double s) {
    double r = 0.0;
    if (d.has_rest) {
        r = d.rest[0];
        if (d.rest[1] != 0.0) r += d.rest[1] * s;
        if (d.rest[2] != 0.0) r += d.rest[2] * sign(s);
        if (d.rest[3] != 0.0) r += d.rest[3] * softplus(-s);
    }
    return r;
}

__device__ __forceinline__ double weighted_f_prime(const fdpg_divergence& d, double s, double log_w, double shift) {
    double out = 0.0;
    const bool dead = log_w == -INFINITY;  // pi(x) = 0: 0 even where exp(a s) or f'(t) is infinite
    for (int k = 0; k < d.n_exp; ++k) out += d.exp_coef[k] * exp(dead ? log_w : d.exp_rate[k] * s + log_w);
    const double r = rest_value(d, s) - shift;
    if (!dead && r != 0.0) {
        const double w = exp(log_w), direct = w * r;
        out += isfinite(direct) && w > 0.0 && isfinite(w) ? direct : copysign(exp(log_w + log(fabs(r))), r);
    }
    return out;
}

// exp(log_w) (f'(s_star) - f'(s)), each part differenced before the weight multiplies it (rest[0], a constant,
// cancels exactly; fdpg.divergences.Divergence.weighted_f_prime_gap); 0 where log_w = -inf.
__device__ __forceinline__ double weighted_gap(const fdpg_divergence& d, double s_star, double s, double log_w) {
    if (log_w == -INFINITY) return 0.0;
    double out = 0.0;
    for (int k = 0; k < d.n_exp; ++k)
        out += d.exp_coef[k] * (exp(d.exp_rate[k] * s_star + log_w) - exp(d.exp_rate[k] * s + log_w));
    double r = 0.0;
    if (d.has_rest) {
        if (d.rest[1] != 0.0) r += d.rest[1] * (s_star - s);
        if (d.rest[2] != 0.0) r += d.rest[2] * (sign(s_star) - sign(s));
        if (d.rest[3] != 0.0) r += d.rest[3] * (softplus(-s_star) - softplus(-s));
    }
    if (r != 0.0) {
        const double w = exp(log_w), direct = w * r;
        out += isfinite(direct) && w > 0.0 && isfinite(w) ? direct : copysign(exp(log_w + log(fabs(r))), r);
    }
    return out;
}

template <typename T>
__device__ __forceinline__ double ld(const T* p, int64_t i) {
    return static_cast<double>(p[i]);
}

// Pass 1 of both kernels: log Z (unless given), logsumexp of log w = log pi - log q and of 2 log w.
template <typename T>
__device__ __forceinline__ void pass_log_z_and_weights(const T* lpi, const T* lq, const T* lP, const T* log_z_in,
                                                       int64_t n, double* smem, double& lz, double& lse_w,
                                                       double& ess, double& max_w) {
    Lse acc[3] = {{-INFINITY, 0.0}, {-INFINITY, 0.0}, {-INFINITY, 0.0}};
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const double a = ld(lpi, i), b = ld(lq, i);
        if (log_z_in == nullptr) acc[0].add(ld(lP, i) - b);
        acc[1].add(a - b);
        acc[2].add(2.0 * (a - b));
    }
    block_lse<3>(acc, smem);
    lz = log_z_in != nullptr ? static_cast<double>(log_z_in[0]) : acc[0].value() - log(static_cast<double>(n));
    lse_w = acc[1].value();
    max_w = acc[1].m;  // the largest log w: one of the a - b above, exactly
    ess = exp(2.0 * lse_w - acc[2].value());  // 1 / sum(w_i^2) of the normalised weights w_i = exp(log w_i - lse_w)
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
coefficients_kernel(const T* __restrict__ lpi, const T* __restrict__ lq, const T* __restrict__ lP,
                    const T* __restrict__ log_z_in, int64_t n, const fdpg_divergence d, int baseline_mode,
                    double baseline_value, T* __restrict__ coef, T* __restrict__ weights, T* __restrict__ log_z_out,
                    T* __restrict__ ess_out, T* __restrict__ baseline_out) {
    __shared__ double smem[32 * 3 * 2];
    __shared__ unsigned long long first_max;
    double lz, lse_w, ess, max_w;
    pass_log_z_and_weights(lpi, lq, lP, log_z_in, n, smem, lz, lse_w, ess, max_w);
    // The reference computes in the input dtype: a float32 log Z is rounded before it enters s.
    lz = static_cast<double>(static_cast<T>(lz));

    double b = baseline_mode == 2 ? baseline_value : 0.0, pair = 0.0, s_star = 0.0;
    int64_t istar = -1;
    if (baseline_mode == 0 && n > 0) {  // self-normalised estimate of E_pi[f'(t)]
        // Differenced against the sample of the largest weight (the first), *: coef_j = -gap_j + wn_j sum_k gap_k
        // with gap_k = w_k (f'_* - f'_k) (fdpg.reference.fdpg_coefficients): f'_j - B cancels to rounding noise
        // where * holds nearly all the weight, for * and any sample with its f'; the gaps do not.
        if (threadIdx.x == 0) first_max = ~0ull;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
            if (ld(lpi, i) - ld(lq, i) == max_w) {
                atomicMin(&first_max, static_cast<unsigned long long>(i));
                break;
            }
        __syncthreads();
        istar = static_cast<int64_t>(first_max);
        s_star = ld(lpi, istar) - ld(lP, istar) + lz;
        double acc[2] = {0.0, 0.0};
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
            const double a = ld(lpi, i), lw = a - ld(lq, i), s_i = a - ld(lP, i) + lz;
            acc[0] += weighted_f_prime(d, s_i, lw - lse_w, 0.0);
            if (i != istar) acc[1] += weighted_gap(d, s_star, s_i, lw);
        }
        block_sum<2>(acc, smem);
        b = acc[0];
        pair = acc[1];
    }
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const double a = ld(lpi, i), lw = a - ld(lq, i);
        const double s_i = a - ld(lP, i) + lz;
        double c;
        if (istar >= 0) {  // the batch baseline: -gap_i + wn_i sum_k gap_k
            const double gap = i == istar ? 0.0 : weighted_gap(d, s_star, s_i, lw);
            c = exp(lw - lse_w) * pair - gap;
        } else {
            c = weighted_f_prime(d, s_i, lw, b);
        }
        coef[i] = static_cast<T>(c);
        weights[i] = static_cast<T>(exp(lw - lse_w));
    }
    if (threadIdx.x == 0) {
        *log_z_out = static_cast<T>(lz);
        *ess_out = static_cast<T>(ess);
        *baseline_out = static_cast<T>(b);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
estimates_kernel(const T* __restrict__ lpi, const T* __restrict__ lq, const T* __restrict__ lP,
                 const T* __restrict__ la, const T* __restrict__ log_z_in, int64_t n, T* __restrict__ out) {
    __shared__ double smem[32 * 5 * 2];
    double lz, lse_w, ess, max_w;
    pass_log_z_and_weights(lpi, lq, lP, log_z_in, n, smem, lz, lse_w, ess, max_w);
    lz = static_cast<double>(static_cast<T>(lz));

    // kl_p_pi, kl_pi_p, tv, js, kl_pi_a: sums of per-sample terms (reference.divergence_estimates)
    double acc[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const double a = ld(lpi, i), b = ld(lq, i);
        const double lp = ld(lP, i) - lz;  // log p
        const double w_pi = exp(a - b), w_p = exp(lp - b);
        acc[0] += w_p > 0.0 ? w_p * (lp - a) : 0.0;
        acc[1] += w_pi > 0.0 ? w_pi * (a - lp) : 0.0;
        acc[2] += fabs(w_pi - w_p);
        const double hi = fmax(a, lp);  // logaddexp(log pi, log p)
        const double m = hi == -INFINITY ? hi : hi + log1p(exp(-fabs(a - lp)));
        acc[3] += (w_pi > 0.0 ? w_pi * (kLog2d + a - m) : 0.0) + (w_p > 0.0 ? w_p * (kLog2d + lp - m) : 0.0);
        if (la != nullptr) acc[4] += w_pi > 0.0 ? w_pi * (a - ld(la, i)) : 0.0;
    }
    block_sum<5>(acc, smem);
    if (threadIdx.x == 0) {
        const double inv_n = 1.0 / static_cast<double>(n);
        out[0] = static_cast<T>(acc[0] * inv_n);
        out[1] = static_cast<T>(acc[1] * inv_n);
        out[2] = static_cast<T>(0.5 * acc[2] * inv_n);
        out[3] = static_cast<T>(0.5 * acc[3] * inv_n);
        out[4] = static_cast<T>(ess);
        out[5] = static_cast<T>(lz);
        out[6] = la != nullptr ? static_cast<T>(acc[4] * inv_n) : static_cast<T>(NAN);
    }
}

int threads_for(int64_t n) {
    int t = 32;
    while (t < kThreads && t < n) t *= 2;
    return t;
}

}  // namespace
}  // namespace fdpg

using namespace fdpg;

extern "C" cudaError_t fdpg_coefficients(int dtype, const void* policy_logprob, const void* proposal_logprob,
                                         const void* target_logscore, const void* log_z, int64_t n,
                                         fdpg_divergence div, int baseline_mode, double baseline_value, void* coef,
                                         void* weights, void* log_z_out, void* ess, void* baseline,
                                         cudaStream_t stream) {
    if (n <= 0 || div.n_exp < 0 || div.n_exp > 4 || baseline_mode < 0 || baseline_mode > 2)
        return cudaErrorInvalidValue;
    const int threads = threads_for(n);
    if (dtype == kF32) {
        coefficients_kernel<float><<<1, threads, 0, stream>>>(
            static_cast<const float*>(policy_logprob), static_cast<const float*>(proposal_logprob),
            static_cast<const float*>(target_logscore), static_cast<const float*>(log_z), n, div, baseline_mode,
            baseline_value, static_cast<float*>(coef), static_cast<float*>(weights), static_cast<float*>(log_z_out),
            static_cast<float*>(ess), static_cast<float*>(baseline));
    } else if (dtype == 3) {
        coefficients_kernel<double><<<1, threads, 0, stream>>>(
            static_cast<const double*>(policy_logprob), static_cast<const double*>(proposal_logprob),
            static_cast<const double*>(target_logscore), static_cast<const double*>(log_z), n, div, baseline_mode,
            baseline_value, static_cast<double*>(coef), static_cast<double*>(weights),
            static_cast<double*>(log_z_out), static_cast<double*>(ess), static_cast<double*>(baseline));
    } else {
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

extern "C" cudaError_t fdpg_estimates(int dtype, const void* policy_logprob, const void* proposal_logprob,
                                      const void* target_logscore, const void* prior_logprob, const void* log_z,
                                      int64_t n, void* out, cudaStream_t stream) {
    if (n <= 0) return cudaErrorInvalidValue;
    const int threads = threads_for(n);
    if (dtype == kF32) {
        estimates_kernel<float><<<1, threads, 0, stream>>>(
            static_cast<const float*>(policy_logprob), static_cast<const float*>(proposal_logprob),
            static_cast<const float*>(target_logscore), static_cast<const float*>(prior_logprob),
            static_cast<const float*>(log_z), n, static_cast<float*>(out));
    } else if (dtype == 3) {
        estimates_kernel<double><<<1, threads, 0, stream>>>(
            static_cast<const double*>(policy_logprob), static_cast<const double*>(proposal_logprob),
            static_cast<const double*>(target_logscore), static_cast<const double*>(prior_logprob),
            static_cast<const double*>(log_z), n, static_cast<double*>(out));
    } else {
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}
