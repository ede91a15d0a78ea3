/* fdpg's CPU sampling loop for GPT-2 and Llama: every decoding step and every draw of one sampling pass in one
 * native call.
 *
 * Built and loaded by fdpg/cpu_decode.py (plain C, no torch headers: compiled in about a second at first use),
 * GEMMs included (gemm below: register tiles over the weights in place; MKL's sgemm, which runs its AVX2 code on
 * AMD processors and packs the weights at every call, ran these small-M GEMMs at a third of this). The batch is
 * split into one block of rows per thread and each thread runs its rows through the whole pass (each sequence
 * decodes independently): no synchronisation (the stop checks count rows, no thread waits for another), and each
 * thread's GEMMs run on that thread. The threads are OpenMP's:
 * linked against the libgomp that torch has loaded, its own thread pool (a thread of our own would compete for a
 * core with torch's idle OpenMP workers, which spin for a while after each parallel op). Per step and row: token +
 * position embedding, per layer LayerNorm, the QKV projection written into the slab slot, single-query attention
 * over the filled slots, the output projection, residual, LayerNorm, MLP, residual; the final norm, the output
 * layer, and the draw (softmax in float32, inverse CDF in float64 with the uniform given for that row and step,
 * as fdpg.sampling._draw). Llama's step (step_llama) is the same with RMSNorm, RoPE, grouped-query attention and
 * SwiGLU, its slab slots [D + 2 Dkv, B] and its own recordings (q and k before RoPE, o, gate, up, down).
 *
 * Memory layouts (all written by the Python side's decoder, fdpg.decode._GPT2, and read back by its replay):
 *   slab        [L, S, 3d, B]  one slot per position: q, k, v of that token, feature-major, batch innermost
 *   rec_<name>  [L, B, S, w]   the proj / fc / act / dact (GELU's derivative) / mlp outputs at every slot (NULL:
 *                              not recording; act and dact: NULL for ReLU, fc: NULL for GELU)
 *   rec_logits  [B, S, V]      rec_ids [S, B] (int64)
 *   pe          [B, S, d]      every slot's position embedding
 *   valid       [B, S] (uint8) which slots hold real tokens (NULL: all)
 *   u           [max_length, B] float64 uniforms; tokens_out [B, max_length] int64; lp_out [B, max_length] float32
 */
#include <math.h>
#ifdef FDPG_NO_OPENMP   /* a compiler without OpenMP (fdpg/cpu_decode.py retries so): one thread, pragmas ignored */
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
#else
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef FDPG_DOUBLE
typedef double real;
#else
typedef float real;
#endif

enum { D_L, D_B, D_S, D_D, D_H, D_F, D_V, D_ACT, D_P, D_MAXLEN, D_EOS, D_PAD, D_EVERY, D_THREADS, D_LLAMA, D_HKV,
       D_HD, D_N };
/* (P_PE, P_LNF_B and the GPT-2 recordings: NULL for Llama; P_REC_Q .. P_SIN: NULL for GPT-2) */
enum { P_WTE, P_PE, P_SLAB, P_LNF_W, P_LNF_B, P_HEAD_W, P_HEAD_B, P_VALID, P_U, P_LOGITS0, P_TOKENS, P_LP,
       P_REC_PROJ, P_REC_FC, P_REC_ACT, P_REC_DACT, P_REC_MLP, P_REC_LOGITS, P_REC_IDS, P_REC_Q, P_REC_K, P_REC_O,
       P_REC_GATE, P_REC_UP, P_REC_DOWN, P_COS, P_SIN, P_LAYERS };
enum { W_LN1_W, W_LN1_B, W_ATTN_W, W_ATTN_B, W_PROJ_W, W_PROJ_B, W_LN2_W, W_LN2_B, W_FC_W, W_FC_B, W_MLP_W,
       W_MLP_B, W_N };
/* a Llama layer: RMSNorm weights, and every Linear's weight transposed ([in, out], contiguous) and bias (or NULL) */
enum { LW_LN1, LW_Q, LW_BQ, LW_K, LW_BK, LW_V, LW_BV, LW_O, LW_BO, LW_LN2, LW_G, LW_BG, LW_U, LW_BU, LW_D, LW_BD,
       LW_N };
enum { ACT_GELU_TANH, ACT_GELU_ERF, ACT_RELU, ACT_SILU };

typedef struct {
    int64_t L, B, S, d, H, F, V, act, P, max_length, eos, pad, every, nthreads, llama, Hkv, hd;
    const double *fp;          /* eps of ln_f, then per layer eps of ln_1, ln_2 and the attention scale */
    void *const *ptr;
    real *head_t;              /* [d, V]: the output layer's weight transposed, for gemm */
    int *counts;               /* [max_length]: rows done at each stop check, summed over threads */
    int *arrived;              /* [max_length]: threads that have added their rows to counts[t] */
} Ctx;

typedef struct {
    Ctx *c;
    int64_t b0, nb;
    int status;
} Work;

#define P(c, k) ((c)->ptr[k])
#define W(c, i, k) ((const real *)(c)->ptr[P_LAYERS + (i) * W_N + (k)])
#define LW(c, i, k) ((const real *)(c)->ptr[P_LAYERS + (i) * LW_N + (k)])

/* the threads to ask OpenMP for: the number asked, at least 1 and at most one per unit of work */
static inline int64_t team(int64_t asked, int64_t work) {
    const int64_t nt = asked < 1 ? 1 : asked;
    return nt > work ? (work > 0 ? work : 1) : nt;
}

/* ---- math ------------------------------------------------------------------------------------------------- */

#ifdef FDPG_DOUBLE
static inline real r_exp(real x) { return exp(x); }
static inline real r_tanh(real x) { return tanh(x); }
static inline real r_erf(real x) { return erf(x); }
#else
/* exp in float (Cephes' polynomial, within 2 ulp), branch-free so that loops over it vectorise; 0 below -87 */
static inline float r_exp(float x) {
    float xc = x > -87.0f ? (x < 88.0f ? x : 88.0f) : -87.0f;     /* (NaN: -87, then 0 below) */
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, sizeof s);
    return x < -87.0f ? 0.0f : y * s;
}
static inline float r_tanh(float x) { return 1.0f - 2.0f / (r_exp(2.0f * x) + 1.0f); }
static inline float r_erf(float x) { return erff(x); }
#endif

static void layer_norm(const real *restrict x, real *restrict y, int64_t rows, int64_t d, const real *restrict w,
                       const real *restrict b, double eps) {
    for (int64_t m = 0; m < rows; m++) {
        const real *xr = x + m * d;
        real *yr = y + m * d;
        real s = 0, v = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < d; j++) s += xr[j];
        real mean = s / (real)d;
#pragma omp simd reduction(+ : v)
        for (int64_t j = 0; j < d; j++) v += (xr[j] - mean) * (xr[j] - mean);
        real rstd = (real)(1.0 / sqrt((double)(v / (real)d) + eps));
#pragma omp simd
        for (int64_t j = 0; j < d; j++) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
    }
}

/* y = act(x + bias) over a row of n (bias NULL: none), and its derivative dy (when not NULL) */
static void activation(const real *restrict x, real *restrict y, real *restrict dy, int64_t n, int64_t act,
                       const real *restrict bias) {
    const real k = (real)0.7978845608028654, c = (real)0.044715, r2 = (real)0.7071067811865476;
    if (act == ACT_GELU_TANH) {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            real v = x[j] + (bias ? bias[j] : 0), t = r_tanh(k * (v + c * v * v * v));
            y[j] = (real)0.5 * v * ((real)1 + t);
            if (dy) dy[j] = (real)0.5 * ((real)1 + t) + (real)0.5 * v * ((real)1 - t * t) * k * ((real)1 + 3 * c * v * v);
        }
    } else if (act == ACT_GELU_ERF) {
        for (int64_t j = 0; j < n; j++) {
            real v = x[j] + (bias ? bias[j] : 0), e = r_erf(v * r2);
            y[j] = (real)0.5 * v * ((real)1 + e);
            if (dy) dy[j] = (real)0.5 * ((real)1 + e) + v * r_exp(-(real)0.5 * v * v) * (real)0.3989422804014327;
        }
    } else {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            real v = x[j] + (bias ? bias[j] : 0);
            y[j] = v > 0 ? v : 0;
        }
    }
}

/* ---- GEMM: C [M, N] (row stride ldc) = C (beta 1) or 0 (beta 0) + A [M, K] @ W [K, N] (row stride ldw) --------
 * A (m, k) at A + m * am + k * ak (A row-major: am = lda, ak = 1; stored [K, M]: am = 1, ak = lda). Tiles of MR rows
 * by two vectors of columns, accumulated in registers over a block of KC rows of K: per k, two vector loads of W's
 * row, MR broadcasts of A, 2 MR FMAs. The weights are read in place (a tile's column block of W, KC rows of two
 * vectors, stays in L1 while the row tiles pass): no packing. About 90% of the FMA peak at the model's shapes
 * (AVX-512, one core: 200-237 GFLOP/s float32 at M = 32 to 2048, K, N = 128 to 512, and K = 2048 for the weight
 * gradient's form). */
#ifdef __AVX512F__
enum { GV = 64 / (int)sizeof(real), MR = 8 };   /* 16 accumulators of 32 vector registers */
#else
enum { GV = 32 / (int)sizeof(real), MR = 6 };   /* 12 of 16 (AVX2) */
#endif
/* unaligned load and store of a vector type T (GCC's vector extension) from and to reals */
#define VEC_IO(T, load, store)                                                                                    \
    static inline T load(const real *p) {                                                                         \
        T v;                                                                                                      \
        memcpy(&v, p, sizeof v);                                                                                  \
        return v;                                                                                                 \
    }                                                                                                             \
    static inline void store(real *p, T v) { memcpy(p, &v, sizeof v); }

typedef real greal __attribute__((vector_size(GV * sizeof(real))));
VEC_IO(greal, gload, gstore)

#define GEMM_TILE(R)                                                                                              \
    static inline __attribute__((always_inline)) void tile##R(int64_t K, const real *A, int64_t am, int64_t ak,  \
                                                               const real *W, int64_t ldw, real *C, int64_t ldc,  \
                                                               int beta) {                                        \
        greal c0[R], c1[R];                                                                                       \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) c0[r] = c1[r] = (greal){0};                          \
        for (int64_t k = 0; k < K; k++) {                                                                         \
            const greal w0 = gload(W + k * ldw), w1 = gload(W + k * ldw + GV);                                    \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                 \
                const greal a = (greal){0} + A[r * am + k * ak];                                                  \
                c0[r] += a * w0;                                                                                  \
                c1[r] += a * w1;                                                                                  \
            }                                                                                                     \
        }                                                                                                         \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                     \
            real *cr = C + r * ldc;                                                                               \
            if (beta) c0[r] += gload(cr), c1[r] += gload(cr + GV);                                                \
            gstore(cr, c0[r]);                                                                                    \
            gstore(cr + GV, c1[r]);                                                                               \
        }                                                                                                         \
    }
GEMM_TILE(MR)
GEMM_TILE(4)
GEMM_TILE(2)
GEMM_TILE(1)
#define TILE_(r) tile##r
#define TILE(r) TILE_(r)

enum { KC = 256 };   /* K in blocks: a tile's column block of W (KC rows of two vectors) stays in L1 */

static void gemm_k(int64_t M, int64_t N, int64_t K, const real *A, int64_t am, int64_t ak, const real *W,
                   int64_t ldw, real *C, int64_t ldc, int beta) {
    const int64_t NB = 2 * GV, Nf = N - N % NB;
    for (int64_t n0 = 0; n0 < Nf; n0 += NB) {
        const real *w = W + n0;
        real *c = C + n0;
        int64_t m = 0;
        for (; m + MR <= M; m += MR) TILE(MR)(K, A + m * am, am, ak, w, ldw, c + m * ldc, ldc, beta);
        for (; m + 4 <= M; m += 4) tile4(K, A + m * am, am, ak, w, ldw, c + m * ldc, ldc, beta);
        for (; m + 2 <= M; m += 2) tile2(K, A + m * am, am, ak, w, ldw, c + m * ldc, ldc, beta);
        for (; m < M; m++) tile1(K, A + m * am, am, ak, w, ldw, c + m * ldc, ldc, beta);
    }
    for (int64_t m = 0; Nf < N && m < M; m++) {     /* the last N % NB columns */
        real *restrict cr = C + m * ldc;
        for (int64_t n = Nf; n < N; n++) cr[n] = beta ? cr[n] : 0;
        for (int64_t k = 0; k < K; k++) {
            const real a = A[m * am + k * ak], *restrict wk = W + k * ldw;
#pragma omp simd
            for (int64_t n = Nf; n < N; n++) cr[n] += a * wk[n];
        }
    }
}

static void gemm_b(int64_t M, int64_t N, int64_t K, const real *A, int64_t am, int64_t ak, const real *W,
                   int64_t ldw, real *C, int64_t ldc, int beta) {
    int64_t k0 = 0;
    do {
        const int64_t kb = K - k0 < KC ? K - k0 : KC;
        gemm_k(M, N, kb, A + k0 * ak, am, ak, W + k0 * ldw, ldw, C, ldc, beta || k0 > 0);
        k0 += kb;
    } while (k0 < K);
}

static void gemm(int64_t M, int64_t N, int64_t K, const real *A, int64_t am, int64_t ak, const real *W, int64_t ldw,
                 real *C, int64_t ldc) {
    gemm_b(M, N, K, A, am, ak, W, ldw, C, ldc, 1);
}

/* rows of n at stride ld: the bias, or 0 */
static void fill_rows(real *restrict y, const real *restrict bias, int64_t rows, int64_t n, int64_t ld) {
    for (int64_t m = 0; m < rows; m++) {
        if (bias) memcpy(y + m * ld, bias, (size_t)n * sizeof(real));
        else memset(y + m * ld, 0, (size_t)n * sizeof(real));
    }
}

static void add_rows(real *restrict x, const real *restrict y, int64_t rows, int64_t n, int64_t ld) {
    for (int64_t m = 0; m < rows; m++)
#pragma omp simd
        for (int64_t j = 0; j < n; j++) x[m * n + j] += y[m * ld + j];
}

/* ---- one decoding step for rows b0 .. b0+nb-1 at slot n -------------------------------------------------- */

typedef struct {
    real *x, *h, *o, *t_d, *f, *g, *t_f, *logits, *sc, *qkv;
} Buf;

/* row b0 of recording k at layer i and slot n (rows at stride S * w), or buf (rows at stride w) */
static real *rec_at(const Ctx *c, int k, int64_t i, int64_t n, int64_t b0, int64_t w, real *buf, int64_t *ld) {
    real *r = (real *)P(c, k);
    *ld = r ? c->S * w : w;
    return r ? r + ((i * c->B + b0) * c->S + n) * w : buf;
}

enum { BM = 64 / (int)sizeof(real) };   /* rows per attention block: one 64-byte vector of reals */

/* BM reals as one vector register (GCC's vector extension: the accumulators below stay in registers) */
typedef real vreal __attribute__((vector_size(BM * sizeof(real))));
VEC_IO(vreal, vload, vstore)

/* The scores sc [n + 1, BM] of a block's first M rows (raw dot products) -> their softmax weights, unnormalised:
 * masked slots out, scaled, exp(s - max); sum [BM] their sums per row */
static inline void block_softmax(int64_t M, int64_t n, const uint8_t *valid, int64_t S, real scale,
                                 real *restrict sc, real *restrict sum) {
    real mx[BM];
    for (int64_t m = 0; m < BM; m++) mx[m] = -INFINITY, sum[m] = 0;
    for (int64_t t = 0; t <= n; t++) {
        real *restrict st = sc + t * BM;
#pragma omp simd
        for (int64_t m = 0; m < M; m++) {
            st[m] = (valid && !valid[m * S + t]) ? -INFINITY : st[m] * scale;
            mx[m] = st[m] > mx[m] ? st[m] : mx[m];
        }
    }
    for (int64_t t = 0; t <= n; t++) {
        real *restrict st = sc + t * BM;
#pragma omp simd
        for (int64_t m = 0; m < M; m++) {
            st[m] = r_exp(st[m] - mx[m]);
            sum[m] += st[m];
        }
    }
}

/* Single-query attention of rows m0..m0+M of the thread's block (M <= BM) for head hh at slot n: the scores of the
 * n + 1 filled slots, their softmax and the weighted values, each accumulated in a BM-wide block over the head's
 * dims (attend_full: the full blocks, in vector registers). q, k, v: the head's first dim of the query row, and of
 * slot 0's key and value, each dim at stride B, slots at stride ls; valid: [B, S] or NULL; sc: (n + 1) * BM
 * scratch; o: the output rows, dim j at o + j * nb. */
static void attend_block(
    int64_t M, int64_t n, int64_t hd, int64_t B, int64_t ls, const real *q, const real *k, const real *v,
    const uint8_t *valid, int64_t S, real scale, real *restrict sc, real *restrict o, int64_t nb) {
    real sum[BM];
    for (int64_t t = 0; t <= n; t++) {
        real *restrict st = sc + t * BM;
        for (int64_t m = 0; m < M; m++) st[m] = 0;
        for (int64_t j = 0; j < hd; j++) {
            const real *restrict qj = q + j * B, *restrict kj = k + t * ls + j * B;
#pragma omp simd
            for (int64_t m = 0; m < M; m++) st[m] += qj[m] * kj[m];
        }
    }
    block_softmax(M, n, valid, S, scale, sc, sum);
    for (int64_t j = 0; j < hd; j++) {
        real a[BM] = {0};
        for (int64_t t = 0; t <= n; t++) {
            const real *restrict vj = v + t * ls + j * B, *restrict st = sc + t * BM;
#pragma omp simd
            for (int64_t m = 0; m < M; m++) a[m] += st[m] * vj[m];
        }
        real *restrict oj = o + j * nb;
#pragma omp simd
        for (int64_t m = 0; m < M; m++) oj[m] = a[m] / sum[m];
    }
}

/* attend_block for a full block of BM rows, its accumulators vectors (as arrays the compiler kept them on the stack,
 * a store and a load every iteration) */
static void attend_full(int64_t n, int64_t hd, int64_t B, int64_t ls, const real *q, const real *k, const real *v,
                        const uint8_t *valid, int64_t S, real scale, real *restrict sc, real *restrict o, int64_t nb) {
    real sum[BM];
    for (int64_t t = 0; t <= n; t++) {
        vreal a = {0};
        for (int64_t j = 0; j < hd; j++) a += vload(q + j * B) * vload(k + t * ls + j * B);
        vstore(sc + t * BM, a);
    }
    block_softmax(BM, n, valid, S, scale, sc, sum);
    const vreal inv = (real)1 / vload(sum);
    for (int64_t j = 0; j < hd; j++) {
        vreal a = {0};
        for (int64_t t = 0; t <= n; t++) a += vload(sc + t * BM) * vload(v + t * ls + j * B);
        a *= inv;
        vstore(o + j * nb, a);
    }
}

static void attention(const Ctx *c, const Work *wk, Buf *bf, int64_t i, int64_t n) {
    const int64_t B = c->B, H = c->H, hd = c->hd, D = H * hd, Dkv = c->Hkv * hd, G = H / c->Hkv;
    const int64_t nb = wk->nb, b0 = wk->b0, ls = (D + 2 * Dkv) * B;
    const real *layer = (const real *)P(c, P_SLAB) + i * c->S * ls;
    const uint8_t *valid = (const uint8_t *)P(c, P_VALID);
    const real scale = (real)c->fp[1 + 3 * i + 2];
    for (int64_t hh = 0; hh < H; hh++) {
        for (int64_t m0 = 0; m0 < nb; m0 += BM) {
            const real *q = layer + n * ls + (hh * hd) * B + b0 + m0;
            const real *k = layer + (D + hh / G * hd) * B + b0 + m0, *v = layer + (D + Dkv + hh / G * hd) * B + b0 + m0;
            const uint8_t *vl = valid ? valid + (b0 + m0) * c->S : NULL;
            real *o = bf->o + (hh * hd) * nb + m0;
            if (nb - m0 >= BM)
                attend_full(n, hd, B, ls, q, k, v, vl, c->S, scale, bf->sc, o, nb);
            else
                attend_block(nb - m0, n, hd, B, ls, q, k, v, vl, c->S, scale, bf->sc, o, nb);
        }
    }
}

/* the output layer over the rows' final-norm outputs bf->h: their logits at slot n, [nb, V] at row stride *ldz (in
 * rec_logits when recording) */
static real *logits_rows(const Ctx *c, const Work *wk, Buf *bf, int64_t n, int64_t *ldz) {
    const int64_t V = c->V, nb = wk->nb;
    real *z = (real *)P(c, P_REC_LOGITS);
    *ldz = z ? c->S * V : V;
    z = z ? z + (wk->b0 * c->S + n) * V : bf->logits;
    fill_rows(z, (const real *)P(c, P_HEAD_B), nb, V, *ldz);
    gemm(nb, V, c->d, bf->h, c->d, 1, c->head_t, V, z, *ldz);
    return z;
}

/* the next logits of the rows after feeding tok at slot n: [nb, V] at row stride *ldz (in rec_logits when
 * recording) */
static real *step(const Ctx *c, const Work *wk, Buf *bf, int64_t n, const int64_t *tok, int64_t *ldz) {
    const int64_t B = c->B, d = c->d, F = c->F, nb = wk->nb, b0 = wk->b0;
    const real *wte = (const real *)P(c, P_WTE), *pe = (const real *)P(c, P_PE);
    int64_t *rec_ids = (int64_t *)P(c, P_REC_IDS);
    for (int64_t m = 0; m < nb; m++) {
        const real *e = wte + tok[m] * d, *p = pe + ((b0 + m) * c->S + n) * d;
        real *x = bf->x + m * d;
        for (int64_t j = 0; j < d; j++) x[j] = e[j] + p[j];
        if (rec_ids) rec_ids[n * B + b0 + m] = tok[m];
    }
    for (int64_t i = 0; i < c->L; i++) {
        const double *eps = c->fp + 1 + 3 * i;
        layer_norm(bf->x, bf->h, nb, d, W(c, i, W_LN1_W), W(c, i, W_LN1_B), eps[0]);
        real *slot = (real *)P(c, P_SLAB) + ((i * c->S + n) * 3 * d) * B + b0;      /* [3d, B] at column b0 */
        const real *ab = W(c, i, W_ATTN_B);
        gemm_b(nb, 3 * d, d, bf->h, d, 1, W(c, i, W_ATTN_W), 3 * d, bf->qkv, 3 * d, 0);
        for (int64_t j = 0; j < 3 * d; j++)                                         /* + bias, transposed */
            for (int64_t m = 0; m < nb; m++) slot[j * B + m] = ab[j] + bf->qkv[m * 3 * d + j];
        attention(c, wk, bf, i, n);
        int64_t ly, lf, lg, ldg;
        real *y = rec_at(c, P_REC_PROJ, i, n, b0, d, bf->t_d, &ly);
        fill_rows(y, W(c, i, W_PROJ_B), nb, d, ly);
        gemm(nb, d, d, bf->o, 1, nb, W(c, i, W_PROJ_W), d, y, ly);
        add_rows(bf->x, y, nb, d, ly);
        layer_norm(bf->x, bf->h, nb, d, W(c, i, W_LN2_W), W(c, i, W_LN2_B), eps[1]);
        real *f = rec_at(c, P_REC_FC, i, n, b0, F, bf->f, &lf), *g = rec_at(c, P_REC_ACT, i, n, b0, F, bf->g, &lg);
        real *dg = rec_at(c, P_REC_DACT, i, n, b0, F, NULL, &ldg);
        fill_rows(f, W(c, i, W_FC_B), nb, F, lf);
        gemm(nb, F, d, bf->h, d, 1, W(c, i, W_FC_W), F, f, lf);
        for (int64_t m = 0; m < nb; m++)
            activation(f + m * lf, g + m * lg, dg ? dg + m * ldg : NULL, F, c->act, NULL);
        y = rec_at(c, P_REC_MLP, i, n, b0, d, bf->t_d, &ly);
        fill_rows(y, W(c, i, W_MLP_B), nb, d, ly);
        gemm(nb, d, F, g, lg, 1, W(c, i, W_MLP_W), d, y, ly);
        add_rows(bf->x, y, nb, d, ly);
    }
    layer_norm(bf->x, bf->h, nb, d, (const real *)P(c, P_LNF_W), (const real *)P(c, P_LNF_B), c->fp[0]);
    return logits_rows(c, wk, bf, n, ldz);
}

/* RMSNorm as fdpg.decode._rms (F.rms_norm): y = x / sqrt(mean(x^2) + eps) * w, rows of d */
static void rms_norm(const real *restrict x, real *restrict y, int64_t rows, int64_t d, const real *restrict w,
                     double eps) {
    for (int64_t m = 0; m < rows; m++) {
        const real *xr = x + m * d;
        real *yr = y + m * d, ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < d; j++) ss += xr[j] * xr[j];
        const real r = (real)(1.0 / sqrt((double)(ss / (real)d) + eps));
#pragma omp simd
        for (int64_t j = 0; j < d; j++) yr[j] = xr[j] * r * w[j];
    }
}

/* y [rows, n] at row stride ld += bias (NULL: nothing) */
static void add_bias(real *restrict y, const real *restrict bias, int64_t rows, int64_t n, int64_t ld) {
    for (int64_t m = 0; bias && m < rows; m++)
#pragma omp simd
        for (int64_t j = 0; j < n; j++) y[m * ld + j] += bias[j];
}

/* A Llama layer's pieces, shared by the sampling step and the forward; lw: the layer's tensors in LW_ order */
#define LWT(k) ((const real *)lw[k])

/* qkv [rows, D + 2 Dkv] = the q, k, v projections of h [rows, d], biases added */
static void llama_qkv(int64_t rows, int64_t d, int64_t D, int64_t Dkv, const real *h, void *const *lw, real *qkv) {
    const int64_t W3 = D + 2 * Dkv;
    gemm_b(rows, D, d, h, d, 1, LWT(LW_Q), D, qkv, W3, 0);
    gemm_b(rows, Dkv, d, h, d, 1, LWT(LW_K), Dkv, qkv + D, W3, 0);
    gemm_b(rows, Dkv, d, h, d, 1, LWT(LW_V), Dkv, qkv + D + Dkv, W3, 0);
    add_bias(qkv, LWT(LW_BQ), rows, D, W3);
    add_bias(qkv + D, LWT(LW_BK), rows, Dkv, W3);
    add_bias(qkv + D + Dkv, LWT(LW_BV), rows, Dkv, W3);
}

/* RoPE over the heads x [heads, hd] of one position: x cos + roll(x, hd / 2) sin (sin carrying rotate_half's sign,
 * as fdpg.decode._rotary), cos and sin of dim e at cs[e * st], sn[e * st] */
static void rope(real *restrict x, int64_t heads, int64_t hd, const real *cs, const real *sn, int64_t st) {
    real rot[hd];
    for (int64_t hh = 0; hh < heads; hh++, x += hd) {
        for (int64_t e = 0; e < hd; e++) rot[e] = x[e] * cs[e * st] + x[(e - hd / 2 + hd) % hd] * sn[e * st];
        memcpy(x, rot, (size_t)hd * sizeof(real));
    }
}

/* the gate and up projections of h [rows, d] into g, u (row strides lg, lu; biases added), then a [rows, F]
 * (contiguous; may be g itself when lg = F) = SiLU(g) * u */
static void llama_gate_up(int64_t rows, int64_t d, int64_t F, const real *h, void *const *lw, real *g, int64_t lg,
                          real *u, int64_t lu, real *a) {
    gemm_b(rows, F, d, h, d, 1, LWT(LW_G), F, g, lg, 0);
    gemm_b(rows, F, d, h, d, 1, LWT(LW_U), F, u, lu, 0);
    add_bias(g, LWT(LW_BG), rows, F, lg);
    add_bias(u, LWT(LW_BU), rows, F, lu);
    for (int64_t m = 0; m < rows; m++) {
        const real *gm = g + m * lg, *um = u + m * lu;
        real *am = a + m * F;
#pragma omp simd
        for (int64_t j = 0; j < F; j++) am[j] = gm[j] / (1 + r_exp(-gm[j])) * um[j];
    }
}
#undef LWT

/* step for Llama (c->llama): RMSNorm, q, k, v (recorded before RoPE), RoPE from the tables cos, sin [S, hd, B]
 * (sin carrying rotate_half's sign), the slot written, grouped-query attention, o, RMSNorm, SiLU(gate) * up, down;
 * as fdpg.decode._Llama's slab step computes them. The weights come transposed ([in, out]). */
static real *step_llama(const Ctx *c, const Work *wk, Buf *bf, int64_t n, const int64_t *tok, int64_t *ldz) {
    const int64_t B = c->B, d = c->d, F = c->F, nb = wk->nb, b0 = wk->b0, hd = c->hd;
    const int64_t D = c->H * hd, Dkv = c->Hkv * hd, W3 = D + 2 * Dkv;
    const real *emb = (const real *)P(c, P_WTE);
    const real *cs = (const real *)P(c, P_COS) + n * hd * B + b0, *sn = (const real *)P(c, P_SIN) + n * hd * B + b0;
    int64_t *rec_ids = (int64_t *)P(c, P_REC_IDS);
    for (int64_t m = 0; m < nb; m++) {
        memcpy(bf->x + m * d, emb + tok[m] * d, (size_t)d * sizeof(real));
        if (rec_ids) rec_ids[n * B + b0 + m] = tok[m];
    }
    for (int64_t i = 0; i < c->L; i++) {
        const double *eps = c->fp + 1 + 3 * i;
        rms_norm(bf->x, bf->h, nb, d, LW(c, i, LW_LN1), eps[0]);
        void *const *lw = c->ptr + P_LAYERS + i * LW_N;
        real *qkv = bf->qkv;
        llama_qkv(nb, d, D, Dkv, bf->h, lw, qkv);
        int64_t lq, lk;
        real *rq = rec_at(c, P_REC_Q, i, n, b0, D, NULL, &lq), *rk = rec_at(c, P_REC_K, i, n, b0, Dkv, NULL, &lk);
        for (int64_t m = 0; rq && m < nb; m++) memcpy(rq + m * lq, qkv + m * W3, (size_t)D * sizeof(real));
        for (int64_t m = 0; rk && m < nb; m++) memcpy(rk + m * lk, qkv + m * W3 + D, (size_t)Dkv * sizeof(real));
        real *slot = (real *)P(c, P_SLAB) + ((i * c->S + n) * W3) * B + b0;         /* [W3, B] at column b0 */
        for (int64_t m = 0; m < nb; m++) {
            real *row = qkv + m * W3;
            rope(row, c->H + c->Hkv, hd, cs + m, sn + m, B);           /* q's heads, then k's */
            for (int64_t j = 0; j < W3; j++) slot[j * B + m] = row[j];
        }
        attention(c, wk, bf, i, n);
        int64_t ly, lg, lu;
        real *y = rec_at(c, P_REC_O, i, n, b0, d, bf->t_d, &ly);
        gemm_b(nb, d, D, bf->o, 1, nb, LW(c, i, LW_O), d, y, ly, 0);
        add_bias(y, LW(c, i, LW_BO), nb, d, ly);
        add_rows(bf->x, y, nb, d, ly);
        rms_norm(bf->x, bf->h, nb, d, LW(c, i, LW_LN2), eps[1]);
        real *g = rec_at(c, P_REC_GATE, i, n, b0, F, bf->f, &lg), *u = rec_at(c, P_REC_UP, i, n, b0, F, bf->g, &lu);
        llama_gate_up(nb, d, F, bf->h, lw, g, lg, u, lu, bf->t_f);
        y = rec_at(c, P_REC_DOWN, i, n, b0, d, bf->t_d, &ly);
        gemm_b(nb, d, F, bf->t_f, F, 1, LW(c, i, LW_D), d, y, ly, 0);
        add_bias(y, LW(c, i, LW_BD), nb, d, ly);
        add_rows(bf->x, y, nb, d, ly);
    }
    rms_norm(bf->x, bf->h, nb, d, (const real *)P(c, P_LNF_W), c->fp[0]);
    return logits_rows(c, wk, bf, n, ldz);
}

/* one token from logits l [V] with the uniform u: softmax in float32, inverse CDF in float64 (right side, as
 * searchsorted(right=True)); lp: its log-probability (NaN when the logits hold a NaN) */
static int64_t draw(const real *restrict l, int64_t V, double u, float *restrict p, float *lp) {
    float mx = -INFINITY;
    int bad = 0;
    for (int64_t j = 0; j < V; j++) {
        float v = (float)l[j];
        bad |= v != v;
        mx = v > mx ? v : mx;
    }
    if (bad || mx == INFINITY) {
        *lp = NAN;
        return 0;
    }
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < V; j++) {
#ifdef FDPG_DOUBLE
        p[j] = expf((float)l[j] - mx);
#else
        p[j] = r_exp(l[j] - mx);
#endif
        s += p[j];
    }
    float inv = 1.0f / s;
    double total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < V; j++) {
        p[j] *= inv;
        total += (double)p[j];
    }
    double target = u * total, cum = 0;
    int64_t tok = V - 1;
    for (int64_t j = 0; j < V; j++) {
        cum += (double)p[j];
        if (cum > target) {
            tok = j;
            break;
        }
    }
    *lp = logf(p[tok]);
    return tok;
}

static void *run_rows(void *arg) {
    Work *wk = (Work *)arg;
    Ctx *c = wk->c;
    const int64_t d = c->d, F = c->F, V = c->V, nb = wk->nb, b0 = wk->b0, B = c->B, T = c->max_length;
    const int64_t D = c->H * c->hd, W3 = D + 2 * c->Hkv * c->hd;
    size_t nr = (size_t)nb;
    Buf bf;
    bf.x = malloc(nr * d * sizeof(real));
    bf.h = malloc(nr * d * sizeof(real));
    bf.o = malloc(nr * D * sizeof(real));
    bf.t_d = malloc(nr * d * sizeof(real));
    bf.f = malloc(nr * F * sizeof(real));
    bf.g = malloc(nr * F * sizeof(real));
    bf.t_f = c->llama ? malloc(nr * F * sizeof(real)) : NULL;
    bf.logits = malloc(nr * V * sizeof(real));
    bf.sc = malloc(BM * c->S * sizeof(real));
    bf.qkv = malloc(nr * W3 * sizeof(real));
    float *p = malloc((size_t)V * sizeof(float));
    int64_t *tok = malloc(nr * sizeof(int64_t));
    uint8_t *done = calloc(nr, 1);
    int ok = bf.x && bf.h && bf.o && bf.t_d && bf.f && bf.g && (bf.t_f || !c->llama) && bf.logits && bf.sc && bf.qkv
             && p && tok && done;
    /* every thread takes part in every stop check, also one whose buffers failed (it reports its rows as not done
     * so that the pass runs to the end, and the caller raises) */
    const real *z = (const real *)P(c, P_LOGITS0) + b0 * V;
    int64_t ldz = V;
    const double *u = (const double *)P(c, P_U);
    int64_t *tokens = (int64_t *)P(c, P_TOKENS);
    float *lps = (float *)P(c, P_LP);
    int64_t next = 0;   /* the first stop check this thread has not found complete (every thread arrived) */
    for (int64_t t = 0; t < T; t++) {
        int64_t n_done = 0;
        if (ok) {
            for (int64_t m = 0; m < nb; m++) {
                float lp;
                int64_t k = draw(z + m * ldz, V, u[t * B + b0 + m], p, &lp);
                if (done[m]) {
                    k = c->pad;
                    lp = 0.0f;
                }
                if (c->eos >= 0 && k == c->eos) done[m] = 1;
                n_done += done[m];
                tok[m] = k;
                tokens[(b0 + m) * T + t] = k;
                lps[(b0 + m) * T + t] = lp;
            }
        }
        if (t + 1 == T) break;
        if (c->eos >= 0 && (t + 1) % c->every == 0) {
            /* No waiting: add this thread's rows, then look at the checks every thread has reached, in order. The
             * first complete check with all B rows done ends the pass (fdpg_sample finds it again); a thread ahead
             * of the others draws on until it sees that, and what it draws past the end is never read. */
            __atomic_fetch_add(&c->counts[t], (int)n_done, __ATOMIC_SEQ_CST);
            __atomic_fetch_add(&c->arrived[t], 1, __ATOMIC_SEQ_CST);
            int stop = 0;
            for (; next <= t && !stop; next++) {
                if ((next + 1) % c->every) continue;
                if (__atomic_load_n(&c->arrived[next], __ATOMIC_SEQ_CST) < c->nthreads) break;
                stop = __atomic_load_n(&c->counts[next], __ATOMIC_SEQ_CST) == B;
            }
            if (stop) break;
        }
        if (ok) z = (c->llama ? step_llama : step)(c, wk, &bf, c->P + t, tok, &ldz);
    }
    free(bf.x), free(bf.h), free(bf.o), free(bf.t_d), free(bf.f), free(bf.g), free(bf.logits), free(bf.sc);
    free(bf.qkv), free(bf.t_f);
    free(p), free(tok), free(done);
    wk->status = ok ? 0 : -1;
    return NULL;
}

/* The whole sampling pass after the prefill. Returns the number of tokens drawn per row (>= 1), -1 when memory
 * ran out. */
int64_t fdpg_sample(const int64_t *dims, const double *fp, void *const *ptr) {
    Ctx c;
    memset(&c, 0, sizeof c);
    int64_t *dst = &c.L;
    for (int k = 0; k < D_N; k++) dst[k] = dims[k];
    c.fp = fp;
    c.ptr = ptr;
    c.nthreads = team(c.nthreads, c.B);
    Work *wk = calloc((size_t)c.nthreads, sizeof(Work));
    c.counts = calloc((size_t)c.max_length, sizeof(int));
    c.arrived = calloc((size_t)c.max_length, sizeof(int));
    c.head_t = malloc((size_t)c.d * c.V * sizeof(real));
    if (!wk || !c.counts || !c.arrived || !c.head_t) {
        free(wk), free(c.counts), free(c.arrived), free(c.head_t);
        return -1;
    }
    const real *head = (const real *)ptr[P_HEAD_W];                  /* [V, d] -> [d, V], in blocks of 16 x 16 */
    for (int64_t v0 = 0; v0 < c.V; v0 += 16)
        for (int64_t j0 = 0; j0 < c.d; j0 += 16)
            for (int64_t v = v0; v < v0 + 16 && v < c.V; v++)
                for (int64_t j = j0; j < j0 + 16 && j < c.d; j++) c.head_t[j * c.V + v] = head[v * c.d + j];
    /* the rows split among the team as it started (OpenMP may give fewer threads than asked) */
#pragma omp parallel num_threads((int)c.nthreads)
    {
#pragma omp single
        {
            const int64_t nt = omp_get_num_threads();
            c.nthreads = nt;
            for (int64_t w = 0; w < nt; w++) {
                wk[w].c = &c;
                wk[w].b0 = w * c.B / nt;
                wk[w].nb = (w + 1) * c.B / nt - wk[w].b0;
            }
        }   /* (the end of single is a barrier: every thread sees the split) */
        run_rows(&wk[omp_get_thread_num()]);
    }
    const int64_t nt = c.nthreads;
    int64_t result = 0;
    for (int64_t w = 0; w < nt; w++)
        if (wk[w].status) result = -1;
    int64_t T = c.max_length;   /* the first check at which every row was done, as the threads found it */
    for (int64_t t = 0; c.eos >= 0 && t + 1 < c.max_length; t++)
        if ((t + 1) % c.every == 0 && c.arrived[t] == nt && c.counts[t] == c.B) {
            T = t + 1;
            break;
        }
    free(wk), free(c.counts), free(c.arrived), free(c.head_t);
    return result ? result : T;
}

/* ---- the no-grad forward over whole sequences (the prior's scoring pass): the activation ------------------- */

typedef struct {
    const int64_t *dims;       /* rows, act, n, nthreads */
    const double *fp;
    void *const *ptr;          /* x, y */
    int64_t b0, b1;
} Job;

/* y = act(x) over rows b0..b1-1 of n elements each (dims[2]) */
static int activation_rows(const void *arg) {
    const Job *jb = (const Job *)arg;
    const int64_t n = jb->dims[2];
    activation((const real *)jb->ptr[0] + jb->b0 * n, (real *)jb->ptr[1] + jb->b0 * n, NULL,
               (jb->b1 - jb->b0) * n, jb->dims[1], NULL);
    return 0;
}

/* rows 0..rows-1 split over up to nthreads threads; 0, or -1 when a block failed */
static int64_t parallel_rows(int64_t rows, int64_t nthreads, const int64_t *dims, const double *fp, void *const *ptr,
                             int (*body)(const void *)) {
    const int64_t nt = team(nthreads, rows);
    int failed = 0;
#pragma omp parallel num_threads((int)nt) reduction(| : failed)
    {
        const int64_t w = omp_get_thread_num(), n = omp_get_num_threads();
        const Job jb = {dims, fp, ptr, w * rows / n, (w + 1) * rows / n};
        failed |= body(&jb) != 0;
    }
    return failed ? -1 : 0;
}

int64_t fdpg_activation(const int64_t *dims, const double *fp, void *const *ptr) {
    return parallel_rows(dims[0], dims[3], dims, fp, ptr, activation_rows);
}

/* one GEMM (fdpg.cpu_gemm, tests, benchmarks/bench_cpu_gemm.py): dims M, N, K, am, ak, ldw, ldc, beta, threads;
 * ptr A, W, C. With several threads the output is cut into blocks of whole tiles, columns first (each thread then
 * reads a column block of W, all of A), taken as threads come free. */
int64_t fdpg_gemm(const int64_t *dims, const double *fp, void *const *ptr) {
    (void)fp;
    const int64_t M = dims[0], N = dims[1], K = dims[2], am = dims[3], ak = dims[4], ldw = dims[5], ldc = dims[6];
    const int beta = (int)dims[7];
    const real *A = (const real *)ptr[0], *W = (const real *)ptr[1];
    real *C = (real *)ptr[2];
    if (M <= 0 || N <= 0) return 0;
    const int64_t nt = team(dims[8], (M + MR - 1) / MR * ((N + 2 * GV - 1) / (2 * GV)));
    /* columns in blocks of whole tiles where there are at least 4 a thread, else rows */
    const int64_t ncb = (N + 2 * GV - 1) / (2 * GV), by_cols = ncb >= 4 * nt;
    const int64_t unit = by_cols ? 2 * GV : MR, extent = by_cols ? N : M;
    const int64_t units = (extent + unit - 1) / unit, per = (units + 4 * nt - 1) / (4 * nt);
    const int64_t chunks = (units + per - 1) / per;
#pragma omp parallel for num_threads((int)nt) schedule(dynamic, 1)
    for (int64_t k = 0; k < chunks; k++) {
        const int64_t lo = k * per * unit, hi = (k + 1) * per * unit < extent ? (k + 1) * per * unit : extent;
        if (by_cols)
            gemm_b(M, hi - lo, K, A, am, ak, W + lo, ldw, C + lo, ldc, beta);
        else
            gemm_b(hi - lo, N, K, A + lo * am, am, ak, W, ldw, C + lo * ldc, ldc, beta);
    }
    return 0;
}

/* ---- attention with autograd (the policy's replay and scoring passes): forward and backward -----------------
 *
 * fdpg_attention: causal attention of q [B, s, H, hd] over k, v [B, s, Hkv, hd] (H a multiple of Hkv: GQA), every
 * tensor at the strides given (b, t, head, e: the slab's views, batch innermost, and packed QKV outputs read in
 * place), under the mask of fdpg.decode's scoring forward: with valid [B, s] (uint8, NULL: no padding) a query
 * attends to the valid keys at or before it and a padding query to itself only. Forward: o, and lse [B, H, s]
 * (each query's log-sum-exp of its scaled scores, for the backward). Backward (flash attention's): the scores'
 * softmax recomputed from lse, dq, dk and dv from do and o. One work item per (KV head, row), KV-head-major
 * (consecutive items read the same cache lines of a batch-innermost slab): its keys and values gathered once into
 * contiguous tiles (keys also transposed: a query's scores are vectors over the keys) for its G query heads, and
 * dk, dv accumulated there (no two items write the same element). Where q, k and v hold the batch innermost (the
 * slab), whole blocks of BM rows go through attention_lanes instead: the same arithmetic with every quantity a
 * vector over the block's rows, QL queries at a time (at the tiny config, a layer at 2 threads: forward 0.83 ->
 * 0.31 ms, backward 1.03 -> 0.65). */
enum { A_MODE, A_B, A_S, A_H, A_HKV, A_HD, A_THREADS, A_STRIDES };
enum { T_Q, T_K, T_V, T_O, T_DO, T_DQ, T_DK, T_DV, T_N };   /* ptr order; each has 4 strides from A_STRIDES */
enum { T_LSE = T_N, T_VALID, A_NPTR };

typedef struct {
    const int64_t *st;         /* [T_N][4] strides in reals */
    void *const *ptr;
} Views;

static inline real *at(const Views *w, int k, int64_t b, int64_t t, int64_t h) {
    const int64_t *st = w->st + 4 * k;
    return (real *)w->ptr[k] + b * st[0] + t * st[1] + h * st[2];
}

/* r_exp, but NaN (a NaN or infinite score, or a NaN log-sum-exp) stays NaN: a query's outputs are NaN then, not
 * silent numbers */
static inline real exp_nan(real x) { return x != x ? x : r_exp(x); }

/* the keys a query t may attend to, 0 .. t, as scores sc[0 .. t] (scaled) with the masked ones at -inf */
static inline void mask_scores(const uint8_t *valid, int64_t t, real *restrict sc) {
    if (!valid) return;
    const int own = !valid[t];
    for (int64_t j = 0; j < t; j++)
        if (own || !valid[j]) sc[j] = -INFINITY;
}

/* queries per block: the loads of a key (value) vector shared by QB register accumulators (1, 2, 4, 8 measured:
 * 8 fastest, forward and backward, at head dims 16 and 64) */
enum { QB = 8 };

/* sc[r, 0 .. np) (row stride sp) = the scores of the QB queries q_[r, 0 .. hd) (row stride hdp) against the keys
 * kt [hd, sp] (transposed), np a multiple of BM */
static inline void block_scores(const real *restrict q_, int64_t hdp, const real *restrict kt, int64_t hd,
                                int64_t sp, int64_t np, real *restrict sc) {
    for (int64_t j0 = 0; j0 < np; j0 += BM) {
        vreal a[QB] = {{0}};
        for (int64_t e = 0; e < hd; e++) {
            const vreal k = vload(kt + e * sp + j0);
            for (int r = 0; r < QB; r++) a[r] += q_[r * hdp + e] * k;
        }
        for (int r = 0; r < QB; r++) vstore(sc + r * sp + j0, a[r]);
    }
}

/* out_r[e] = scale_r * sum_j w[r, j] rows[j, e] for the first nr of the QB rows, e < hd (w: row stride sp; rows
 * [n, hdp]); out_r = out + r * ort, its dims at stride oe */
static inline void block_weighted(const real *restrict w, int64_t sp, const real *restrict rows, int64_t n,
                                  int64_t hd, int64_t hdp, const real *scale, int64_t nr, real *restrict out,
                                  int64_t ort, int64_t oe) {
    for (int64_t e0 = 0; e0 < hd; e0 += BM) {
        vreal a[QB] = {{0}};
        for (int64_t j = 0; j < n; j++) {
            const vreal v = vload(rows + j * hdp + e0);
            for (int r = 0; r < QB; r++) a[r] += w[r * sp + j] * v;
        }
        const int64_t ne = hd - e0 < BM ? hd - e0 : BM;
        for (int64_t r = 0; r < nr; r++)
            for (int64_t e = 0; e < ne; e++) out[r * ort + (e0 + e) * oe] = a[r][e] * scale[r];
    }
}

static int attention_items(const int64_t *dims, const double *fp, void *const *ptr, int64_t i0, int64_t i1) {
    const int64_t bwd = dims[A_MODE], B = dims[A_B], s = dims[A_S], H = dims[A_H], Hkv = dims[A_HKV];
    const int64_t hd = dims[A_HD], G = H / Hkv, sp = (s + BM - 1) / BM * BM, hdp = (hd + BM - 1) / BM * BM;
    const Views w = {dims + A_STRIDES, ptr};
    const int64_t *st = w.st;
    const real scale = (real)fp[0];
    /* kt, vt [hd, sp]: keys, values transposed (vt: backward); vv, kk, dk, dv [s, hdp]: values, keys, their
     * gradients (kk, dk, dv: backward); sc, dp [QB, sp]: a query block's scores (then probabilities) and dP (then
     * dS); q_, do_ [QB, hdp]: its queries (scaled) and output gradients; every padding zero */
    const size_t n_buf = (size_t)hd * sp + (size_t)s * hdp + 2 * (size_t)QB * (sp + hdp) +
                         (bwd ? (size_t)hd * sp + 3 * (size_t)s * hdp : 0);
    real *buf = calloc(n_buf, sizeof(real));
    if (!buf) return -1;
    real *kt = buf, *vv = kt + hd * sp, *sc = vv + s * hdp, *dp = sc + QB * sp, *q_ = dp + QB * sp;
    real *do_ = q_ + QB * hdp, *vt = do_ + QB * hdp, *kk = vt + hd * sp, *dk = kk + s * hdp, *dv = dk + s * hdp;
    const int64_t ke = st[4 * T_K + 3], ve = st[4 * T_V + 3], qe = st[4 * T_Q + 3], oe = st[4 * T_O + 3];
    const int64_t qt_ = st[4 * T_Q + 1], ot_ = st[4 * T_O + 1], dqe = st[4 * T_DQ + 3], dqt = st[4 * T_DQ + 1];
    for (int64_t it = i0; it < i1; it++) {
        const int64_t g = it / B, b = it % B;
        const uint8_t *valid = ptr[T_VALID] ? (const uint8_t *)ptr[T_VALID] + b * s : NULL;
        /* the tiles (their padding stays zero from calloc); the transposed ones written along their rows */
        const real *k0 = at(&w, T_K, b, 0, g), *v0 = at(&w, T_V, b, 0, g);
        const int64_t kt_ = st[4 * T_K + 1], vt_ = st[4 * T_V + 1];
        for (int64_t e = 0; e < hd; e++)
            for (int64_t j = 0; j < s; j++) kt[e * sp + j] = k0[j * kt_ + e * ke];
        for (int64_t j = 0; j < s; j++)
            for (int64_t e = 0; e < hd; e++) vv[j * hdp + e] = v0[j * vt_ + e * ve];
        if (bwd) {
            for (int64_t j = 0; j < s; j++)
                for (int64_t e = 0; e < hd; e++) kk[j * hdp + e] = k0[j * kt_ + e * ke];
            for (int64_t e = 0; e < hd; e++)
                for (int64_t j = 0; j < s; j++) vt[e * sp + j] = v0[j * vt_ + e * ve];
        }
        if (bwd) memset(dk, 0, 2 * (size_t)s * hdp * sizeof(real));   /* dk and dv */
        for (int64_t hh = g * G; hh < (g + 1) * G; hh++) {
            real *lse = ptr[T_LSE] ? (real *)ptr[T_LSE] + (b * H + hh) * s : NULL;     /* (forward: optional) */
            const real *q0 = at(&w, T_Q, b, 0, hh);
            for (int64_t t0 = 0; t0 < s; t0 += QB) {
                /* queries t0 .. t0 + nr - 1 over keys 0 .. n - 1 (np: whole vectors) */
                const int64_t nr = s - t0 < QB ? s - t0 : QB, n = t0 + nr, np = (n + BM - 1) / BM * BM;
                for (int64_t r = 0; r < QB; r++)                 /* (rows past nr: zero) */
                    for (int64_t e = 0; e < hd; e++) q_[r * hdp + e] = r < nr ? q0[(t0 + r) * qt_ + e * qe] * scale : 0;
                block_scores(q_, hdp, kt, hd, sp, np, sc);
                for (int64_t r = 0; r < nr; r++) {
                    real *scr = sc + r * sp;
                    for (int64_t j = t0 + r + 1; j < n; j++) scr[j] = -INFINITY;   /* (causal) */
                    mask_scores(valid, t0 + r, scr);
                }
                if (!bwd) {
                    real inv[QB] = {0};
                    for (int64_t r = 0; r < nr; r++) {
                        real *restrict scr = sc + r * sp, mx = -INFINITY, sum = 0;
#pragma omp simd reduction(max : mx)
                        for (int64_t j = 0; j < n; j++) mx = scr[j] > mx ? scr[j] : mx;
#pragma omp simd reduction(+ : sum)
                        for (int64_t j = 0; j < n; j++) sum += (scr[j] = exp_nan(scr[j] - mx));
                        inv[r] = (real)1 / sum;
                        if (lse) lse[t0 + r] = mx + (real)log((double)sum);
                    }
                    block_weighted(sc, sp, vv, n, hd, hdp, inv, nr, at(&w, T_O, b, t0, hh), ot_, oe);
                    continue;
                }
                /* backward: p = exp(sc - lse); dP = do . v; dS = p (dP - do . o); dq = scale dS k; dk += dS q
                 * (q scaled); dv += p do */
                const real *o0 = at(&w, T_O, b, t0, hh), *do0 = at(&w, T_DO, b, t0, hh);
                const int64_t de = st[4 * T_DO + 3], dt_ = st[4 * T_DO + 1];
                real Dt[QB] = {0};
                for (int64_t r = 0; r < QB; r++)
                    for (int64_t e = 0; e < hd; e++) {
                        do_[r * hdp + e] = r < nr ? do0[r * dt_ + e * de] : 0;
                        Dt[r] += r < nr ? do_[r * hdp + e] * o0[r * ot_ + e * oe] : 0;
                    }
                block_scores(do_, hdp, vt, hd, sp, np, dp);
                for (int64_t r = 0; r < QB; r++) {                  /* (rows past nr: p = dS = 0) */
                    real *restrict scr = sc + r * sp, *restrict dpr = dp + r * sp;
                    const real l = r < nr ? lse[t0 + r] : INFINITY, D = Dt[r];
#pragma omp simd
                    for (int64_t j = 0; j < n; j++) {
                        scr[j] = exp_nan(scr[j] - l);               /* p (0 where masked) */
                        dpr[j] = scr[j] * (dpr[j] - D);             /* dS */
                    }
                }
                real scales[QB];
                for (int r = 0; r < QB; r++) scales[r] = scale;
                block_weighted(dp, sp, kk, n, hd, hdp, scales, nr, at(&w, T_DQ, b, t0, hh), dqt, dqe);
                for (int64_t e0 = 0; e0 < hd; e0 += BM) {
                    vreal qv[QB], dov[QB];
                    for (int r = 0; r < QB; r++) qv[r] = vload(q_ + r * hdp + e0), dov[r] = vload(do_ + r * hdp + e0);
                    for (int64_t j = 0; j < n; j++) {
                        vreal a = vload(dk + j * hdp + e0), c = vload(dv + j * hdp + e0);
                        for (int r = 0; r < QB; r++) a += dp[r * sp + j] * qv[r], c += sc[r * sp + j] * dov[r];
                        vstore(dk + j * hdp + e0, a);
                        vstore(dv + j * hdp + e0, c);
                    }
                }
            }
        }
        if (bwd)
            for (int64_t j = 0; j < s; j++) {
                real *dkj = at(&w, T_DK, b, j, g), *dvj = at(&w, T_DV, b, j, g);
                const int64_t dke = st[4 * T_DK + 3], dve = st[4 * T_DV + 3];
                for (int64_t e = 0; e < hd; e++) dkj[e * dke] = dk[j * hdp + e];
                for (int64_t e = 0; e < hd; e++) dvj[e * dve] = dv[j * hdp + e];
            }
    }
    free(buf);
    return 0;
}

/* attention_items over blocks of BM batch rows where q, k and v hold the batch innermost (batch stride 1: the
 * replay's slab): every score, softmax and product a vector over the block's rows, no tile gathers. o, do, dq, dk,
 * dv at any strides (through small per-block tiles). Items i0 .. i1 - 1 are (KV head, block) pairs, KV-head-major;
 * the blocks are whole (the caller sends a last partial block to attention_items). */
/* exp_nan of every lane */
static inline vreal lane_exp(vreal x) {
    real a[BM];
    memcpy(a, &x, sizeof a);
#pragma omp simd
    for (int l = 0; l < BM; l++) a[l] = exp_nan(a[l]);
    memcpy(&x, a, sizeof a);
    return x;
}

/* the tile x [hd, BM] (a vector per dim) written to rows b0 .. b0 + BM - 1 of out at (t, h): out_b[e] at
 * out + b * sb + e * se */
static inline void tile_store(const vreal *x, int64_t hd, real *out, int64_t sb, int64_t se) {
    if (sb == 1) {
        for (int64_t e = 0; e < hd; e++) vstore(out + e * se, x[e]);
        return;
    }
    for (int l = 0; l < BM; l++)
        for (int64_t e = 0; e < hd; e++) out[l * sb + e * se] = x[e][l];
}

static inline void tile_load(vreal *x, int64_t hd, const real *in, int64_t sb, int64_t se) {
    if (sb == 1) {
        for (int64_t e = 0; e < hd; e++) x[e] = vload(in + e * se);
        return;
    }
    for (int l = 0; l < BM; l++)
        for (int64_t e = 0; e < hd; e++) x[e][l] = in[l * sb + e * se];
}

enum { QL = 4 };   /* queries a step of attention_lanes: each key and value vector loaded once for QL of them */

static int attention_lanes(const int64_t *dims, const double *fp, void *const *ptr, int64_t i0, int64_t i1) {
    const int64_t bwd = dims[A_MODE], B = dims[A_B], s = dims[A_S], H = dims[A_H], Hkv = dims[A_HKV];
    const int64_t hd = dims[A_HD], G = H / Hkv, nblk = B / BM;
    const Views w = {dims + A_STRIDES, ptr};
    const int64_t *st = w.st;
    const real scale = (real)fp[0];
#define ST(k, i) st[4 * (k) + (i)]
#define AT(k, b, t, h) ((real *)ptr[k] + (b) * ST(k, 0) + (t) * ST(k, 1) + (h) * ST(k, 2))
    /* pk: per slot, 0 or -inf by the block's rows' validity; sc [QL, s]: the step's queries' scores, then
     * probabilities; ds [QL, s]: their dP, then dS; qt, ot, dot [QL, hd]: their q (scaled), o, do tiles (ot: also
     * the output's and dq's accumulators); dk, dv [s, hd] accumulators */
    const size_t nv = (size_t)s * (1 + 2 * QL) + 3 * (size_t)QL * hd + (bwd ? 2 * (size_t)s * hd : 0);
    vreal *buf = aligned_alloc(sizeof(vreal), nv * sizeof(vreal));      /* (vector loads: aligned) */
    if (!buf) return -1;
    vreal *pk = buf, *sc = pk + s, *ds = sc + QL * s, *qt = ds + QL * s, *ot = qt + QL * hd, *dot = ot + QL * hd;
    vreal *dk = dot + QL * hd, *dv = dk + (bwd ? s * hd : 0);
    const vreal zero = {0};
    for (int64_t it = i0; it < i1; it++) {
        const int64_t g = it / nblk, b0 = (it % nblk) * BM;
        const uint8_t *valid = ptr[T_VALID] ? (const uint8_t *)ptr[T_VALID] + b0 * s : NULL;
        for (int64_t j = 0; j < s; j++)
            for (int l = 0; l < BM; l++) pk[j][l] = valid && !valid[l * s + j] ? -INFINITY : 0;
        const real *k0 = AT(T_K, b0, 0, g), *v0 = AT(T_V, b0, 0, g);
        const int64_t kt_ = ST(T_K, 1), ke = ST(T_K, 3), vt_ = ST(T_V, 1), ve = ST(T_V, 3);
        if (bwd) memset(dk, 0, 2 * (size_t)s * hd * sizeof(vreal));     /* dk and dv */
        for (int64_t hh = g * G; hh < (g + 1) * G; hh++) {
            real *lse = (real *)ptr[T_LSE];
            for (int64_t t0 = 0; t0 < s; t0 += QL) {
                const int64_t nq = s - t0 < QL ? s - t0 : QL, n = t0 + nq;      /* queries t0 .. n - 1 */
                /* (the rows past nq: zero queries and gradients, computed and left unwritten: the loops over the
                 * QL rows have a constant count and keep their accumulators in registers) */
                vreal pq[QL], mx[QL], l_t[QL];
                for (int64_t r = 0; r < QL; r++) {
                    const real *q = AT(T_Q, b0, t0 + r, hh);
                    for (int64_t e = 0; e < hd; e++) qt[r * hd + e] = r < nq ? vload(q + e * ST(T_Q, 3)) * scale : zero;
                    for (int l = 0; l < BM; l++) pq[r][l] = r < nq && valid && !valid[l * s + t0 + r] ? -INFINITY : 0;
                    mx[r] = zero - INFINITY;
                }
                /* the scores of keys 0 .. n - 1: causal, and the padding masks as -inf penalties (a query always
                 * sees itself) */
                for (int64_t j = 0; j < n; j++) {
                    vreal a[QL] = {{0}};
                    for (int64_t e = 0; e < hd; e++) {
                        const vreal kv = vload(k0 + j * kt_ + e * ke);
                        for (int r = 0; r < QL; r++) a[r] += qt[r * hd + e] * kv;
                    }
                    for (int r = 0; r < QL; r++) {
                        const int64_t t = t0 + r;
                        const vreal x = j < t ? a[r] + pk[j] + pq[r] : j == t ? a[r] : zero - INFINITY;
                        sc[r * s + j] = x;
                        for (int l = 0; l < BM; l++) mx[r][l] = x[l] > mx[r][l] ? x[l] : mx[r][l];
                    }
                }
                if (!bwd) {
                    vreal sum[QL];
                    for (int r = 0; r < QL; r++) {
                        sum[r] = zero;
                        for (int64_t j = 0; j < n; j++) sum[r] += (sc[r * s + j] = lane_exp(sc[r * s + j] - mx[r]));
                    }
                    for (int64_t e = 0; e < hd; e++) {
                        vreal a[QL] = {{0}};
                        for (int64_t j = 0; j < n; j++) {
                            const vreal vv = vload(v0 + j * vt_ + e * ve);
                            for (int r = 0; r < QL; r++) a[r] += sc[r * s + j] * vv;
                        }
                        for (int r = 0; r < QL; r++) ot[r * hd + e] = a[r] / sum[r];
                    }
                    for (int64_t r = 0; r < nq; r++) {
                        tile_store(ot + r * hd, hd, AT(T_O, b0, t0 + r, hh), ST(T_O, 0), ST(T_O, 3));
                        if (lse)
                            for (int l = 0; l < BM; l++)
                                lse[((b0 + l) * H + hh) * s + t0 + r] = mx[r][l] + (real)log((double)sum[r][l]);
                    }
                    continue;
                }
                /* backward: p = exp(sc - lse); dP = do . v; dS = p (dP - do . o); dq = scale dS k; dk += dS q
                 * (q scaled); dv += p do */
                vreal D[QL];
                for (int64_t r = 0; r < QL; r++) {
                    D[r] = zero;
                    if (r >= nq) {                          /* p = dS = 0 */
                        for (int64_t e = 0; e < hd; e++) dot[r * hd + e] = zero;
                        for (int64_t j = 0; j < n; j++) sc[r * s + j] = zero;
                        continue;
                    }
                    for (int l = 0; l < BM; l++) l_t[r][l] = lse[((b0 + l) * H + hh) * s + t0 + r];
                    tile_load(dot + r * hd, hd, AT(T_DO, b0, t0 + r, hh), ST(T_DO, 0), ST(T_DO, 3));
                    tile_load(ot + r * hd, hd, AT(T_O, b0, t0 + r, hh), ST(T_O, 0), ST(T_O, 3));
                    for (int64_t e = 0; e < hd; e++) D[r] += dot[r * hd + e] * ot[r * hd + e];
                    for (int64_t j = 0; j < n; j++) sc[r * s + j] = lane_exp(sc[r * s + j] - l_t[r]);
                }
                for (int64_t j = 0; j < n; j++) {
                    vreal a[QL] = {{0}};
                    for (int64_t e = 0; e < hd; e++) {
                        const vreal vv = vload(v0 + j * vt_ + e * ve);
                        for (int r = 0; r < QL; r++) a[r] += dot[r * hd + e] * vv;
                    }
                    for (int r = 0; r < QL; r++) ds[r * s + j] = sc[r * s + j] * (a[r] - D[r]);
                }
                for (int64_t e = 0; e < hd; e++) {          /* dq (into ot: o is read) */
                    vreal a[QL] = {{0}};
                    for (int64_t j = 0; j < n; j++) {
                        const vreal kv = vload(k0 + j * kt_ + e * ke);
                        for (int r = 0; r < QL; r++) a[r] += ds[r * s + j] * kv;
                    }
                    for (int r = 0; r < QL; r++) ot[r * hd + e] = a[r] * scale;
                }
                for (int64_t r = 0; r < nq; r++)
                    tile_store(ot + r * hd, hd, AT(T_DQ, b0, t0 + r, hh), ST(T_DQ, 0), ST(T_DQ, 3));
                for (int64_t j = 0; j < n; j++) {
                    vreal *dkj = dk + j * hd, *dvj = dv + j * hd;
                    for (int64_t e = 0; e < hd; e++) {
                        vreal a = dkj[e], c = dvj[e];
                        for (int r = 0; r < QL; r++) {
                            a += ds[r * s + j] * qt[r * hd + e];
                            c += sc[r * s + j] * dot[r * hd + e];
                        }
                        dkj[e] = a, dvj[e] = c;
                    }
                }
            }
        }
        for (int64_t j = 0; bwd && j < s; j++) {
            tile_store(dk + j * hd, hd, AT(T_DK, b0, j, g), ST(T_DK, 0), ST(T_DK, 3));
            tile_store(dv + j * hd, hd, AT(T_DV, b0, j, g), ST(T_DV, 0), ST(T_DV, 3));
        }
    }
#undef AT
#undef ST
    free(buf);
    return 0;
}

/* ---- the no-grad forward over whole sequences (the prior's scoring pass): every layer ------------------------
 *
 * fdpg_forward: the final-norm hidden states out [B, s, d] of ids [B, s] (int64), with GPT-2's position embeddings
 * pe [B, s, d] already gathered (Llama: its RoPE tables) and valid [B, s] (uint8, NULL: no padding): a query attends
 * to the valid keys at or before it, and a padding query to itself only (as fdpg.decode's scoring forward). Each
 * thread takes a block of rows through every layer with its GEMMs over all of its rows' positions at once (M = rows
 * x s, the GEMM on that thread). */
enum { F_L, F_B, F_S, F_D, F_H, F_F, F_ACT, F_THREADS, F_CHUNK, F_LLAMA, F_HKV, F_HD, F_N };
/* (Q_PE, Q_LNF_B: NULL for Llama; Q_COS, Q_SIN [B, s, hd], sin with rotate_half's sign: NULL for GPT-2) */
enum { Q_IDS, Q_PE, Q_WTE, Q_VALID, Q_OUT, Q_LNF_W, Q_LNF_B, Q_COS, Q_SIN, Q_LAYERS };

/* x += y + bias (NULL: none), rows of n (contiguous) */
static void add_bias_rows(real *restrict x, const real *restrict y, const real *restrict bias, int64_t rows,
                          int64_t n) {
    for (int64_t m = 0; m < rows; m++)
#pragma omp simd
        for (int64_t j = 0; j < n; j++) x[m * n + j] += y[m * n + j] + (bias ? bias[j] : 0);
}

/* causal attention of nb rows' qkv [nb, s, 3d] -> o [nb, s, d] (fdpg_forward's mask), on the calling thread: whole
 * blocks of BM rows through attention_lanes (over a copy of their qkv with the batch innermost: the prior's pass
 * 3-5% faster at the tiny config), the rest one by one; 0, or -1 when out of memory */
static int attend(int64_t nb, int64_t s, int64_t H, int64_t Hkv, int64_t hd, const real *qkv, real *o,
                  const uint8_t *valid, double scale) {
    const int64_t D = H * hd, Dkv = Hkv * hd, W3 = D + 2 * Dkv;
    int64_t dims[A_STRIDES + 4 * T_N] = {0, nb, s, H, Hkv, hd, 1};
    const int64_t in[4] = {s * W3, W3, hd, 1}, out[4] = {s * D, D, hd, 1};
    for (int k = 0; k < 4; k++) {
        dims[A_STRIDES + 4 * T_Q + k] = dims[A_STRIDES + 4 * T_K + k] = dims[A_STRIDES + 4 * T_V + k] = in[k];
        dims[A_STRIDES + 4 * T_O + k] = out[k];
    }
    void *ptr[A_NPTR] = {(void *)qkv, (void *)(qkv + D), (void *)(qkv + D + Dkv), o};
    ptr[T_VALID] = (void *)valid;
    const int64_t nl = nb / BM * BM;
    real *qt = nl ? malloc((size_t)nl * s * W3 * sizeof(real)) : NULL;
    if (qt) {
        for (int64_t b0 = 0; b0 < nl; b0 += BM)
            for (int64_t t = 0; t < s; t++)
                for (int64_t f = 0; f < W3; f++)
                    for (int64_t l = 0; l < BM; l++)
                        qt[(t * W3 + f) * nl + b0 + l] = qkv[((b0 + l) * s + t) * W3 + f];
        int64_t dl[A_STRIDES + 4 * T_N];
        memcpy(dl, dims, sizeof dl);
        dl[A_B] = nl;
        const int64_t lanes[4] = {1, W3 * nl, hd * nl, nl};
        for (int k = 0; k < 4; k++)
            dl[A_STRIDES + 4 * T_Q + k] = dl[A_STRIDES + 4 * T_K + k] = dl[A_STRIDES + 4 * T_V + k] = lanes[k];
        void *pl[A_NPTR];
        memcpy(pl, ptr, sizeof pl);
        pl[T_Q] = qt, pl[T_K] = qt + D * nl, pl[T_V] = qt + (D + Dkv) * nl;
        const int r = attention_lanes(dl, &scale, pl, 0, nl / BM * Hkv);
        free(qt);
        if (r) return r;
        if (nl == nb) return 0;
    }
    int failed = 0;     /* the other rows (all of them where the copy could not be allocated), one by one */
    for (int64_t g = 0; g < Hkv && !failed; g++)
        failed = attention_items(dims, &scale, ptr, g * nb + (qt ? nl : 0), g * nb + nb);
    return failed;
}

/* rows b0 .. b0 + nb - 1 through the model; 0, or -1 when out of memory */
static int forward_rows(const int64_t *fd, const double *fp, void *const *ptr, int64_t b0, int64_t nb) {
    const int64_t L = fd[F_L], s = fd[F_S], d = fd[F_D], H = fd[F_H], F = fd[F_F], act = fd[F_ACT];
    const int64_t M = nb * s;
    const int64_t *ids = (const int64_t *)ptr[Q_IDS] + b0 * s;
    const real *pe = (const real *)ptr[Q_PE] + b0 * s * d, *wte = (const real *)ptr[Q_WTE];
    const uint8_t *valid = ptr[Q_VALID] ? (const uint8_t *)ptr[Q_VALID] + b0 * s : NULL;
    real *x = malloc((size_t)M * d * sizeof(real)), *h = malloc((size_t)M * d * sizeof(real));
    real *qkv = malloc((size_t)M * 3 * d * sizeof(real)), *o = malloc((size_t)M * d * sizeof(real));
    real *f = malloc((size_t)M * F * sizeof(real)), *g = malloc((size_t)M * F * sizeof(real));
    int ok = x && h && qkv && o && f && g;
    for (int64_t m = 0; ok && m < M; m++) {
        const real *e = wte + ids[m] * d, *p = pe + m * d;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) x[m * d + j] = e[j] + p[j];
    }
#define FW(i, k) ((const real *)ptr[Q_LAYERS + (i) * W_N + (k)])
    for (int64_t i = 0; ok && i < L; i++) {
        const double *eps = fp + 1 + 3 * i;
        layer_norm(x, h, M, d, FW(i, W_LN1_W), FW(i, W_LN1_B), eps[0]);
        fill_rows(qkv, FW(i, W_ATTN_B), M, 3 * d, 3 * d);
        gemm(M, 3 * d, d, h, d, 1, FW(i, W_ATTN_W), 3 * d, qkv, 3 * d);
        if (!(ok = attend(nb, s, H, H, d / H, qkv, o, valid, eps[2]) == 0)) break;
        gemm_b(M, d, d, o, d, 1, FW(i, W_PROJ_W), d, h, d, 0);
        add_bias_rows(x, h, FW(i, W_PROJ_B), M, d);
        layer_norm(x, h, M, d, FW(i, W_LN2_W), FW(i, W_LN2_B), eps[1]);
        gemm_b(M, F, d, h, d, 1, FW(i, W_FC_W), F, f, F, 0);
        for (int64_t m = 0; m < M; m++) activation(f + m * F, g + m * F, NULL, F, act, FW(i, W_FC_B));
        gemm_b(M, d, F, g, F, 1, FW(i, W_MLP_W), d, h, d, 0);
        add_bias_rows(x, h, FW(i, W_MLP_B), M, d);
    }
#undef FW
    if (ok)
        layer_norm(x, (real *)ptr[Q_OUT] + b0 * s * d, M, d, (const real *)ptr[Q_LNF_W], (const real *)ptr[Q_LNF_B],
                   fp[0]);
    free(x), free(h), free(qkv), free(o), free(f), free(g);
    return ok ? 0 : -1;
}

/* forward_rows for Llama (fd[F_LLAMA]): RMSNorm, q, k, v (+ biases), RoPE from the tables, grouped-query
 * attention, o, RMSNorm, SiLU(gate) * up, down; the weights transposed ([in, out]) in LW_ order */
static int forward_rows_llama(const int64_t *fd, const double *fp, void *const *ptr, int64_t b0, int64_t nb) {
    const int64_t L = fd[F_L], s = fd[F_S], d = fd[F_D], H = fd[F_H], F = fd[F_F], Hkv = fd[F_HKV], hd = fd[F_HD];
    const int64_t M = nb * s, D = H * hd, Dkv = Hkv * hd, W3 = D + 2 * Dkv;
    const int64_t *ids = (const int64_t *)ptr[Q_IDS] + b0 * s;
    const real *emb = (const real *)ptr[Q_WTE];
    const real *cs = (const real *)ptr[Q_COS] + b0 * s * hd, *sn = (const real *)ptr[Q_SIN] + b0 * s * hd;
    const uint8_t *valid = ptr[Q_VALID] ? (const uint8_t *)ptr[Q_VALID] + b0 * s : NULL;
    real *x = malloc((size_t)M * d * sizeof(real)), *h = malloc((size_t)M * d * sizeof(real));
    real *qkv = malloc((size_t)M * W3 * sizeof(real)), *o = malloc((size_t)M * D * sizeof(real));
    real *f = malloc((size_t)M * F * sizeof(real)), *g = malloc((size_t)M * F * sizeof(real));
    int ok = x && h && qkv && o && f && g;
    for (int64_t m = 0; ok && m < M; m++) memcpy(x + m * d, emb + ids[m] * d, (size_t)d * sizeof(real));
#define FL(i, k) ((const real *)ptr[Q_LAYERS + (i) * LW_N + (k)])
    for (int64_t i = 0; ok && i < L; i++) {
        const double *eps = fp + 1 + 3 * i;
        void *const *lw = ptr + Q_LAYERS + i * LW_N;
        rms_norm(x, h, M, d, FL(i, LW_LN1), eps[0]);
        llama_qkv(M, d, D, Dkv, h, lw, qkv);
        for (int64_t m = 0; m < M; m++) rope(qkv + m * W3, H + Hkv, hd, cs + m * hd, sn + m * hd, 1);
        if (!(ok = attend(nb, s, H, Hkv, hd, qkv, o, valid, eps[2]) == 0)) break;
        gemm_b(M, d, D, o, D, 1, FL(i, LW_O), d, h, d, 0);
        add_bias_rows(x, h, FL(i, LW_BO), M, d);
        rms_norm(x, h, M, d, FL(i, LW_LN2), eps[1]);
        llama_gate_up(M, d, F, h, lw, f, F, g, F, f);
        gemm_b(M, d, F, f, F, 1, FL(i, LW_D), d, h, d, 0);
        add_bias_rows(x, h, FL(i, LW_BD), M, d);
    }
#undef FL
    if (ok) rms_norm(x, (real *)ptr[Q_OUT] + b0 * s * d, M, d, (const real *)ptr[Q_LNF_W], fp[0]);
    free(x), free(h), free(qkv), free(o), free(f), free(g);
    return ok ? 0 : -1;
}

int64_t fdpg_forward(const int64_t *dims, const double *fp, void *const *ptr) {
    const int64_t B = dims[F_B];
    const int64_t nt = team(dims[F_THREADS], B);
    /* rows in chunks taken by the threads as they come free (a core slowed by a neighbour does fewer), about four
     * a thread, each with buffers (x, h: d; o: D; qkv: D + 2 Dkv; f, g: F wide; a row's s positions) within
     * dims[F_CHUNK] bytes: a long or wide model does not take several buffers of the whole batch at once */
    const int64_t D = dims[F_H] * dims[F_HD], W3 = D + 2 * dims[F_HKV] * dims[F_HD];
    const int64_t per_row = dims[F_S] * (2 * dims[F_D] + W3 + D + 2 * dims[F_F]) * (int64_t)sizeof(real);
    int64_t rows = (B + 4 * nt - 1) / (4 * nt);
    if (rows * per_row > dims[F_CHUNK]) rows = per_row >= dims[F_CHUNK] ? 1 : dims[F_CHUNK] / per_row;
    if (rows < 1) rows = 1;
    if (rows < BM && B >= 2 * BM * nt && BM * per_row <= dims[F_CHUNK]) rows = BM;   /* attention's row blocks */
    const int64_t chunks = (B + rows - 1) / rows;
    int failed = 0;
#pragma omp parallel num_threads((int)nt) reduction(| : failed)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < chunks; k++)
            if (!failed)
                failed |= (dims[F_LLAMA] ? forward_rows_llama : forward_rows)(dims, fp, ptr, k * rows,
                                                                             B - k * rows < rows ? B - k * rows : rows);
    }
    return failed ? -1 : 0;
}

int64_t fdpg_attention(const int64_t *dims, const double *fp, void *const *ptr) {
    const int64_t B = dims[A_B], Hkv = dims[A_HKV], *st = dims + A_STRIDES;
    /* q, k, v with the batch innermost: blocks of BM rows as vectors (attention_lanes), the rows past the last
     * whole block one by one */
    const int64_t nblk = st[4 * T_Q] == 1 && st[4 * T_K] == 1 && st[4 * T_V] == 1 ? B / BM : 0;
    const int64_t rest = B - nblk * BM, items = nblk * Hkv + rest * Hkv;
    const int64_t nt = team(dims[A_THREADS], items);
    /* chunks of consecutive items (they share cache lines) taken by the threads as they come free */
    const int64_t per = (items + 8 * nt - 1) / (8 * nt), chunks = per ? (items + per - 1) / per : 0;
    int failed = 0;
#pragma omp parallel for num_threads((int)nt) schedule(dynamic, 1) reduction(| : failed)
    for (int64_t k = 0; k < chunks; k++) {
        const int64_t lo = k * per, hi = items < (k + 1) * per ? items : (k + 1) * per, nl = nblk * Hkv;
        if (lo < nl) failed |= attention_lanes(dims, fp, ptr, lo, hi < nl ? hi : nl) != 0;
        /* the other items: (KV head, row) for the rows nblk * BM .. B - 1 */
        for (int64_t i = lo > nl ? lo : nl; i < hi && !failed; i++) {
            const int64_t g = (i - nl) / rest, b = nblk * BM + (i - nl) % rest;
            failed |= attention_items(dims, fp, ptr, g * B + b, g * B + b + 1) != 0;
        }
    }
    return failed ? -1 : 0;
}
