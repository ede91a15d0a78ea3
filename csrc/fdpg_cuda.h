// C launchers of fdpg's CUDA kernels (csrc/*.cu). Each returns the launch status (cudaGetLastError()); nothing
// synchronises. All pointers are device pointers to contiguous data; [N] arrays are float32 unless noted.
//
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16, 3 = float64 (float64 only where noted).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Where the rows of a logits tensor [..., V] with contiguous columns start: row r at element
// (r / t1) * s0 + (r % t1) * s1 (leading dims merged into at most two levels; contiguous: {V, 0, 1}).
typedef struct {
    int64_t s0, s1, t1;
} fdpg_rows;

// Per-token log-probs of `targets` [N] under softmax(policy / T) and softmax(prior / T) (logits: N rows of V),
// one pass over each row of both. prior may be NULL (then nothing of the prior is written; with_kl must be 0).
// Writes policy_lp, policy_lse (logsumexp of policy / T), policy_max (max of policy / T), the same three of the
// prior, and where asked the policy's entropy H(pi) and the exact KL(pi || prior) over the vocabulary.
// An out-of-range target gives a NaN log-prob.
cudaError_t fdpg_paired_logprobs_fwd(int policy_dtype, int prior_dtype, const void* policy, fdpg_rows policy_rows,
                                     const void* prior, fdpg_rows prior_rows, const int64_t* targets, int64_t rows,
                                     int64_t vocab, float temperature, int with_entropy, int with_kl,
                                     float* policy_lp, float* policy_lse, float* policy_max, float* prior_lp,
                                     float* prior_lse, float* prior_max, float* entropy, float* kl,
                                     cudaStream_t stream);

// Gradient with respect to the policy logits, written in the policy dtype to grad_out (which may be the policy
// buffer itself, same rows: in place):
//   grad = [g_lp (onehot - p) + g_lse p - g_H p (log p + H) + g_KL p (log p - log a - KL)] / T.
// grad_lp, grad_lse, grad_entropy and grad_kl may each be NULL (zero). grad_entropy needs entropy; grad_kl needs
// prior, prior_lse and kl.
cudaError_t fdpg_paired_logprobs_bwd(int policy_dtype, int prior_dtype, const void* policy, fdpg_rows policy_rows,
                                     const void* prior, fdpg_rows prior_rows, void* grad_out, fdpg_rows out_rows,
                                     const int64_t* targets, const float* policy_lse, const float* prior_lse,
                                     const float* grad_lp, const float* grad_lse, const float* grad_entropy,
                                     const float* grad_kl, const float* entropy, const float* kl, int64_t rows,
                                     int64_t vocab, float temperature, cudaStream_t stream);

// out[b] = sum_t mask[b, t] ? values[b, t] : 0 for values [B, T] (dtype 0 = float32 or 3 = float64), mask uint8
// [B, T]; the same for values2 into out2 when values2 is not NULL (policy and prior in one launch).
cudaError_t fdpg_masked_row_sums(int dtype, const void* values, const void* values2, const uint8_t* mask,
                                 int64_t rows, int64_t cols, void* out, void* out2, cudaStream_t stream);

// f' of a built-in divergence as sum_k exp_coef[k] exp(exp_rate[k] s) + rest(s), with
// rest(s) = r[0] + r[1] s + r[2] sign(s) + r[3] softplus(-s) when has_rest (fdpg/divergences.py).
typedef struct {
    int n_exp;
    double exp_coef[4];
    double exp_rate[4];
    int has_rest;
    double rest[4];
} fdpg_divergence;

// f-DPG coefficients of N sequences in one single-block launch (dtype 0 = float32 or 3 = float64 for every
// array). log_z may be NULL (estimated as logsumexp(lP - lq) - log N). baseline_mode 0 = batch, 1 = none,
// 2 = baseline_value. Writes coef [N], weights [N] and the scalars log_z_out, ess, baseline.
cudaError_t fdpg_coefficients(int dtype, const void* policy_logprob, const void* proposal_logprob,
                              const void* target_logscore, const void* log_z, int64_t n, fdpg_divergence div,
                              int baseline_mode, double baseline_value, void* coef, void* weights, void* log_z_out,
                              void* ess, void* baseline, cudaStream_t stream);

// Importance-sampling estimates (fdpg.reference.divergence_estimates) in one single-block launch. prior_logprob
// and log_z may be NULL. Writes out[7] = {kl_p_pi, kl_pi_p, tv, js, ess, log_z, kl_pi_a (NaN without prior)}.
cudaError_t fdpg_estimates(int dtype, const void* policy_logprob, const void* proposal_logprob,
                           const void* target_logscore, const void* prior_logprob, const void* log_z, int64_t n,
                           void* out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
