// torch binding of fdpg's CUDA kernels: the ops torch.ops.fdpg_cuda.*_on_stream (schemas below, CUDA
// implementations here; fake implementations for torch.compile are registered in Python, fdpg/_cuda.py).
//
// Only <torch/library.h>, <ATen/ATen.h> and <cuda_runtime.h> are used from torch and CUDA, so that this file
// also builds against a CPU build of torch (whose CUDA headers are incomplete): the caller passes the CUDA stream
// as an integer (torch.cuda.current_stream().cuda_stream), and the kernels are plain C launchers (fdpg_cuda.h).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "fdpg_cuda.h"

namespace {

using at::Tensor;
using std::optional;

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)); }

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "fdpg_cuda.", what, ": kernel launch failed: ", cudaGetErrorString(err));
}

void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
    TORCH_CHECK(t.is_cuda(), "fdpg_cuda: ", name, ": expected a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == like.device(), "fdpg_cuda: ", name, ": expected a tensor on ", like.device(),
                ", got one on ", t.device());
}

int logits_code(const Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kFloat: return 0;
        case at::kHalf: return 1;
        case at::kBFloat16: return 2;
        default:
            TORCH_CHECK_TYPE(false, "fdpg_cuda: ", name, ": expected float32, float16 or bfloat16 logits, got ",
                             t.scalar_type());
    }
    return -1;
}

int seq_code(const Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kFloat: return 0;
        case at::kDouble: return 3;
        default:
            TORCH_CHECK_TYPE(false, "fdpg_cuda: ", name, ": expected float32 or float64, got ", t.scalar_type());
    }
    return -1;
}

// Rows of a logits tensor [..., V]: the tensor itself when its columns are contiguous and its leading dims merge
// into at most two levels (e.g. logits[:, :-1] of a [B, T, V] tensor), else a contiguous copy.
struct Rows {
    Tensor t;
    fdpg_rows L;
};

Rows row_layout(const Tensor& x) {
    const int64_t V = x.size(-1);
    Tensor y = (V > 1 && x.stride(-1) != 1) ? x.contiguous() : x;
    std::vector<std::pair<int64_t, int64_t>> merged;  // (size, stride), outermost first
    for (int64_t d = 0; d + 1 < y.dim(); ++d) {
        const int64_t n = y.size(d), st = y.stride(d);
        if (n == 1) continue;
        if (!merged.empty() && merged.back().second == st * n) {
            merged.back() = {merged.back().first * n, st};
        } else {
            merged.emplace_back(n, st);
        }
    }
    if (merged.size() > 2) return {y.contiguous(), {V, 0, 1}};
    if (merged.empty()) return {y, {0, 0, 1}};
    if (merged.size() == 1) return {y, {merged[0].second, 0, 1}};
    return {y, {merged[0].second, merged[1].second, merged[1].first}};
}

// True when two elements of x may share memory (an expand-ed tensor): unfit to be written in place.
bool overlapping(const Tensor& x) {
    std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
    for (int64_t d = 0; d < x.dim(); ++d)
        if (x.size(d) != 1) dims.emplace_back(x.stride(d), x.size(d));
    std::sort(dims.begin(), dims.end());
    int64_t extent = 1;
    for (const auto& [st, n] : dims) {
        if (st < extent) return true;
        extent = st * n;
    }
    return false;
}

struct Logits {
    Rows policy, prior;
    Tensor targets;
    std::vector<int64_t> lead;
    int64_t n, v;
};

Logits check_logits(const Tensor& policy, const optional<Tensor>& prior, const Tensor& targets) {
    TORCH_CHECK(policy.dim() >= 1, "fdpg_cuda: policy_logits: expected shape [..., V], got ", policy.sizes());
    TORCH_CHECK(policy.size(-1) >= 1 && policy.size(-1) < (int64_t{1} << 31),
                "fdpg_cuda: policy_logits: expected 1 <= V < 2^31, got V = ", policy.size(-1));
    TORCH_CHECK(policy.is_cuda(), "fdpg_cuda: policy_logits: expected a CUDA tensor, got one on ", policy.device());
    logits_code(policy, "policy_logits");
    Logits r;
    r.lead = policy.sizes().slice(0, policy.dim() - 1).vec();
    r.v = policy.size(-1);
    r.n = policy.numel() / r.v;
    r.policy = row_layout(policy);
    if (prior.has_value() && prior->defined()) {
        check_cuda(*prior, "prior_logits", policy);
        logits_code(*prior, "prior_logits");
        TORCH_CHECK(prior->sizes() == policy.sizes(), "fdpg_cuda: prior_logits: expected shape ", policy.sizes(),
                    " like policy_logits, got ", prior->sizes());
        r.prior = row_layout(*prior);
    }
    check_cuda(targets, "targets", policy);
    TORCH_CHECK(targets.sizes().vec() == r.lead, "fdpg_cuda: targets: expected shape ", at::IntArrayRef(r.lead),
                " (the leading dims of policy_logits), got ", targets.sizes());
    TORCH_CHECK(!at::isFloatingType(targets.scalar_type()) && targets.scalar_type() != at::kBool,
                "fdpg_cuda: targets: expected integer token ids, got ", targets.scalar_type());
    r.targets = targets.reshape({-1}).to(at::kLong).contiguous();
    return r;
}

// A contiguous float32 vector of the n row values (given with the leading shape), or an undefined tensor.
Tensor row_vector(const optional<Tensor>& t, const char* name, const Tensor& like, int64_t n) {
    if (!t.has_value() || !t->defined()) return Tensor();
    check_cuda(*t, name, like);
    TORCH_CHECK(t->numel() == n, "fdpg_cuda: ", name, ": expected ", n, " values (one per row), got shape ",
                t->sizes());
    return t->reshape({-1}).to(at::kFloat).contiguous();
}

const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

using Fwd8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Fwd8 paired_logprobs_fwd(const Tensor& policy, const optional<Tensor>& prior, const Tensor& targets,
                         double temperature, bool with_entropy, bool with_kl, int64_t stream) {
    Logits L = check_logits(policy, prior, targets);
    const bool has_prior = L.prior.t.defined();
    TORCH_CHECK(!with_kl || has_prior, "fdpg_cuda: with_kl needs prior_logits");
    TORCH_CHECK(temperature > 0.0, "fdpg_cuda: temperature: expected a positive number, got ", temperature);
    c10::DeviceGuard guard(policy.device());
    const auto opts = policy.options().dtype(at::kFloat);
    auto vec = [&](bool want) { return want ? at::empty(L.lead, opts) : at::empty({0}, opts); };
    Tensor lp = vec(true), lse = vec(true), mx = vec(true), qlp = vec(has_prior), qlse = vec(has_prior),
           qmx = vec(has_prior), ent = vec(with_entropy), kl = vec(with_kl);
    auto ptr = [](const Tensor& t, bool want) { return want ? t.data_ptr<float>() : nullptr; };
    const fdpg_rows none{0, 0, 1};
    check_launch(fdpg_paired_logprobs_fwd(logits_code(policy, "policy_logits"),
                                          has_prior ? logits_code(L.prior.t, "prior_logits") : -1,
                                          L.policy.t.data_ptr(), L.policy.L,
                                          has_prior ? L.prior.t.data_ptr() : nullptr, has_prior ? L.prior.L : none,
                                          L.targets.data_ptr<int64_t>(), L.n, L.v, static_cast<float>(temperature),
                                          with_entropy, with_kl, lp.data_ptr<float>(), lse.data_ptr<float>(),
                                          mx.data_ptr<float>(), ptr(qlp, has_prior), ptr(qlse, has_prior),
                                          ptr(qmx, has_prior), ptr(ent, with_entropy), ptr(kl, with_kl),
                                          as_stream(stream)),
                 "paired_logprobs_fwd");
    return {lp, lse, mx, qlp, qlse, qmx, ent, kl};
}

void paired_logprobs_bwd_into(const Logits& L, const Rows& out, const Tensor& policy_lse,
                              const optional<Tensor>& prior_lse, const optional<Tensor>& grad_lp,
                              const optional<Tensor>& grad_lse, const optional<Tensor>& grad_entropy,
                              const optional<Tensor>& grad_kl, const optional<Tensor>& entropy,
                              const optional<Tensor>& kl, double temperature, int64_t stream) {
    TORCH_CHECK(temperature > 0.0, "fdpg_cuda: temperature: expected a positive number, got ", temperature);
    const Tensor& like = L.policy.t;
    Tensor lse = row_vector(policy_lse, "policy_lse", like, L.n);
    TORCH_CHECK(lse.defined(), "fdpg_cuda: policy_lse is required");
    Tensor glp = row_vector(grad_lp, "grad_lp", like, L.n), glse = row_vector(grad_lse, "grad_lse", like, L.n);
    Tensor gent = row_vector(grad_entropy, "grad_entropy", like, L.n);
    Tensor gkl = row_vector(grad_kl, "grad_kl", like, L.n);
    Tensor ent = row_vector(entropy, "entropy", like, L.n), klv = row_vector(kl, "kl", like, L.n);
    Tensor qlse = row_vector(prior_lse, "prior_lse", like, L.n);
    TORCH_CHECK(!gent.defined() || ent.defined(), "fdpg_cuda: grad_entropy needs the forward's entropy");
    const bool use_kl = gkl.defined();
    TORCH_CHECK(!use_kl || (klv.defined() && qlse.defined() && L.prior.t.defined()),
                "fdpg_cuda: grad_kl needs prior_logits, prior_lse and the forward's kl");
    const fdpg_rows none{0, 0, 1};
    c10::DeviceGuard guard(like.device());
    check_launch(fdpg_paired_logprobs_bwd(logits_code(like, "policy_logits"),
                                          use_kl ? logits_code(L.prior.t, "prior_logits") : -1, like.data_ptr(),
                                          L.policy.L, use_kl ? L.prior.t.data_ptr() : nullptr,
                                          use_kl ? L.prior.L : none, out.t.data_ptr(), out.L,
                                          L.targets.data_ptr<int64_t>(), fptr(lse), fptr(qlse), fptr(glp),
                                          fptr(glse), fptr(gent), fptr(gkl), fptr(ent), fptr(klv), L.n, L.v,
                                          static_cast<float>(temperature), as_stream(stream)),
                 "paired_logprobs_bwd");
}

Tensor paired_logprobs_bwd(const Tensor& policy, const optional<Tensor>& prior, const Tensor& targets,
                           const Tensor& policy_lse, const optional<Tensor>& prior_lse,
                           const optional<Tensor>& grad_lp, const optional<Tensor>& grad_lse,
                           const optional<Tensor>& grad_entropy, const optional<Tensor>& grad_kl,
                           const optional<Tensor>& entropy, const optional<Tensor>& kl, double temperature,
                           int64_t stream) {
    Logits L = check_logits(policy, prior, targets);
    c10::DeviceGuard guard(policy.device());
    Tensor out = at::empty(policy.sizes(), policy.options().memory_format(at::MemoryFormat::Contiguous));
    paired_logprobs_bwd_into(L, Rows{out, {L.v, 0, 1}}, policy_lse, prior_lse, grad_lp, grad_lse, grad_entropy,
                             grad_kl, entropy, kl, temperature, stream);
    return out;
}

void paired_logprobs_bwd_inplace(Tensor& policy, const optional<Tensor>& prior, const Tensor& targets,
                                 const Tensor& policy_lse, const optional<Tensor>& prior_lse,
                                 const optional<Tensor>& grad_lp, const optional<Tensor>& grad_lse,
                                 const optional<Tensor>& grad_entropy, const optional<Tensor>& grad_kl,
                                 const optional<Tensor>& entropy, const optional<Tensor>& kl, double temperature,
                                 int64_t stream) {
    TORCH_CHECK(!overlapping(policy), "fdpg_cuda: policy_logits: its elements overlap in memory (an expand-ed "
                "tensor?); the in-place backward needs distinct elements");
    Logits L = check_logits(policy, prior, targets);
    // Reading a row of the policy, then writing its gradient over it, is safe only when rows do not share memory
    // with the prior's rows (the prior is read until the end).
    TORCH_CHECK(!(grad_kl.has_value() && grad_kl->defined()) || !L.prior.t.defined() ||
                    !L.prior.t.is_alias_of(policy),
                "fdpg_cuda: prior_logits must not share memory with the policy logits written in place");
    paired_logprobs_bwd_into(L, L.policy, policy_lse, prior_lse, grad_lp, grad_lse, grad_entropy, grad_kl, entropy,
                             kl, temperature, stream);
    if (!L.policy.t.is_same(policy)) policy.copy_(L.policy.t);  // the kernel wrote into a contiguous copy
}

std::tuple<Tensor, Tensor> sequence_sums(const Tensor& token_lp, const optional<Tensor>& token_lp2,
                                         const Tensor& mask, int64_t stream) {
    TORCH_CHECK(token_lp.dim() >= 1, "fdpg_cuda: token_lp: expected shape [..., T], got ", token_lp.sizes());
    TORCH_CHECK(token_lp.is_cuda(), "fdpg_cuda: token_lp: expected a CUDA tensor, got one on ", token_lp.device());
    check_cuda(mask, "mask", token_lp);
    TORCH_CHECK(mask.sizes() == token_lp.sizes(), "fdpg_cuda: mask: expected shape ", token_lp.sizes(),
                " like token_lp, got ", mask.sizes());
    const int code = seq_code(token_lp, "token_lp");
    const bool two = token_lp2.has_value() && token_lp2->defined();
    if (two) {
        check_cuda(*token_lp2, "token_lp2", token_lp);
        TORCH_CHECK(token_lp2->sizes() == token_lp.sizes(), "fdpg_cuda: token_lp2: expected shape ",
                    token_lp.sizes(), ", got ", token_lp2->sizes());
    }
    const int64_t T = token_lp.size(-1), B = T > 0 ? token_lp.numel() / T : 1;
    std::vector<int64_t> lead = token_lp.sizes().slice(0, token_lp.dim() - 1).vec();
    c10::DeviceGuard guard(token_lp.device());
    Tensor v = token_lp.contiguous();
    Tensor v2 = two ? token_lp2->to(token_lp.scalar_type()).contiguous() : Tensor();
    Tensor m = (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous().view(at::kByte);
    Tensor out = at::empty(lead, token_lp.options()), out2 = two ? at::empty(lead, token_lp.options())
                                                                 : at::empty({0}, token_lp.options());
    if (T == 0) {
        out.zero_();
        out2.zero_();
        return {out, out2};
    }
    check_launch(fdpg_masked_row_sums(code, v.data_ptr(), two ? v2.data_ptr() : nullptr, m.data_ptr<uint8_t>(), B,
                                      T, out.data_ptr(), two ? out2.data_ptr() : nullptr, as_stream(stream)),
                 "sequence_sums");
    return {out, out2};
}

struct Sequences {
    Tensor lpi, lq, lP, la, lz;
    int code;
};

Sequences check_sequences(const Tensor& lpi, const Tensor& lq, const Tensor& lP, const optional<Tensor>& la,
                          const optional<Tensor>& log_z) {
    TORCH_CHECK(lpi.dim() == 1 && lpi.size(0) > 0, "fdpg_cuda: policy_logprob: expected a non-empty [N], got ",
                lpi.sizes());
    TORCH_CHECK(lpi.is_cuda(), "fdpg_cuda: policy_logprob: expected a CUDA tensor, got one on ", lpi.device());
    Sequences s;
    s.code = seq_code(lpi, "policy_logprob");
    auto same = [&](const Tensor& t, const char* name) {
        check_cuda(t, name, lpi);
        TORCH_CHECK(t.sizes() == lpi.sizes(), "fdpg_cuda: ", name, ": expected shape ", lpi.sizes(),
                    " like policy_logprob, got ", t.sizes());
        return t.to(lpi.scalar_type()).contiguous();
    };
    s.lpi = lpi.contiguous();
    s.lq = same(lq, "proposal_logprob");
    s.lP = same(lP, "target_logscore");
    if (la.has_value() && la->defined()) s.la = same(*la, "prior_logprob");
    if (log_z.has_value() && log_z->defined()) {
        check_cuda(*log_z, "log_z", lpi);
        TORCH_CHECK(log_z->numel() == 1, "fdpg_cuda: log_z: expected a scalar, got shape ", log_z->sizes());
        s.lz = log_z->reshape({1}).to(lpi.scalar_type()).contiguous();
    }
    return s;
}

const void* vptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> coefficients(
    const Tensor& policy_logprob, const Tensor& proposal_logprob, const Tensor& target_logscore,
    const optional<Tensor>& log_z, at::ArrayRef<double> exp_coef, at::ArrayRef<double> exp_rate,
    at::ArrayRef<double> rest, int64_t baseline_mode, double baseline_value, int64_t stream) {
    Sequences s = check_sequences(policy_logprob, proposal_logprob, target_logscore, std::nullopt, log_z);
    TORCH_CHECK(exp_coef.size() == exp_rate.size() && exp_coef.size() <= 4,
                "fdpg_cuda: exp_coef and exp_rate: expected equal lengths of at most 4");
    TORCH_CHECK(rest.empty() || rest.size() == 4, "fdpg_cuda: rest: expected 0 or 4 numbers");
    TORCH_CHECK(baseline_mode >= 0 && baseline_mode <= 2, "fdpg_cuda: baseline_mode: expected 0, 1 or 2");
    fdpg_divergence d{};
    d.n_exp = static_cast<int>(exp_coef.size());
    for (size_t k = 0; k < exp_coef.size(); ++k) {
        d.exp_coef[k] = exp_coef[k];
        d.exp_rate[k] = exp_rate[k];
    }
    d.has_rest = rest.empty() ? 0 : 1;
    for (size_t k = 0; k < rest.size(); ++k) d.rest[k] = rest[k];
    c10::DeviceGuard guard(policy_logprob.device());
    const int64_t n = s.lpi.size(0);
    Tensor coef = at::empty({n}, s.lpi.options()), weights = at::empty({n}, s.lpi.options());
    Tensor lz = at::empty({}, s.lpi.options()), ess = at::empty({}, s.lpi.options()),
           base = at::empty({}, s.lpi.options());
    check_launch(fdpg_coefficients(s.code, s.lpi.data_ptr(), s.lq.data_ptr(), s.lP.data_ptr(), vptr(s.lz), n, d,
                                   static_cast<int>(baseline_mode), baseline_value, coef.data_ptr(),
                                   weights.data_ptr(), lz.data_ptr(), ess.data_ptr(), base.data_ptr(),
                                   as_stream(stream)),
                 "coefficients");
    return {coef, lz, weights, ess, base};
}

Tensor estimates(const Tensor& policy_logprob, const Tensor& proposal_logprob, const Tensor& target_logscore,
                 const optional<Tensor>& prior_logprob, const optional<Tensor>& log_z, int64_t stream) {
    Sequences s = check_sequences(policy_logprob, proposal_logprob, target_logscore, prior_logprob, log_z);
    c10::DeviceGuard guard(policy_logprob.device());
    Tensor out = at::empty({7}, s.lpi.options());
    check_launch(fdpg_estimates(s.code, s.lpi.data_ptr(), s.lq.data_ptr(), s.lP.data_ptr(), vptr(s.la), vptr(s.lz),
                                s.lpi.size(0), out.data_ptr(), as_stream(stream)),
                 "estimates");
    return out;
}

}  // namespace

TORCH_LIBRARY(fdpg_cuda, m) {
    m.def("paired_logprobs_fwd_on_stream(Tensor policy_logits, Tensor? prior_logits, Tensor targets, "
          "float temperature, bool with_entropy, bool with_kl, int stream) -> (Tensor policy_lp, Tensor policy_lse, "
          "Tensor policy_max, Tensor prior_lp, Tensor prior_lse, Tensor prior_max, Tensor entropy, Tensor kl)");
    m.def("paired_logprobs_bwd_on_stream(Tensor policy_logits, Tensor? prior_logits, Tensor targets, "
          "Tensor policy_lse, Tensor? prior_lse, Tensor? grad_lp, Tensor? grad_lse, Tensor? grad_entropy, "
          "Tensor? grad_kl, Tensor? entropy, Tensor? kl, float temperature, int stream) -> Tensor");
    m.def("paired_logprobs_bwd_inplace_on_stream(Tensor(a!) policy_logits, Tensor? prior_logits, Tensor targets, "
          "Tensor policy_lse, Tensor? prior_lse, Tensor? grad_lp, Tensor? grad_lse, Tensor? grad_entropy, "
          "Tensor? grad_kl, Tensor? entropy, Tensor? kl, float temperature, int stream) -> ()");
    m.def("sequence_sums_on_stream(Tensor token_lp, Tensor? token_lp2, Tensor mask, int stream) -> (Tensor, Tensor)");
    m.def("coefficients_on_stream(Tensor policy_logprob, Tensor proposal_logprob, Tensor target_logscore, "
          "Tensor? log_z, float[] exp_coef, float[] exp_rate, float[] rest, int baseline_mode, "
          "float baseline_value, int stream) -> (Tensor coef, Tensor log_z, Tensor weights, Tensor ess, "
          "Tensor baseline)");
    m.def("estimates_on_stream(Tensor policy_logprob, Tensor proposal_logprob, Tensor target_logscore, "
          "Tensor? prior_logprob, Tensor? log_z, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(fdpg_cuda, CUDA, m) {
    m.impl("paired_logprobs_fwd_on_stream", &paired_logprobs_fwd);
    m.impl("paired_logprobs_bwd_on_stream", &paired_logprobs_bwd);
    m.impl("paired_logprobs_bwd_inplace_on_stream", &paired_logprobs_bwd_inplace);
    m.impl("sequence_sums_on_stream", &sequence_sums);
    m.impl("coefficients_on_stream", &coefficients);
    m.impl("estimates_on_stream", &estimates);
}
