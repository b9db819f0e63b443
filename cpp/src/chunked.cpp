// Chunked folding of a matrix memory: a run of n tokens costs a handful of small matrix products
// (kernels().gemm) rather than n sweeps over S, so a prefill is bound by arithmetic, not by
// streaming S through the caches once per token.
//
// Within a run, S_0 is the state before it, c_t = g_0 + ... + g_t the cumulative log decay (a
// scalar, or one per key dimension) and gamma_t = exp(c_t). Unrolling the recurrence,
//   S_t = diag(gamma_t) S_0 + sum_{s<=t} diag(gamma_t / gamma_s) k_s u_s^T,
// so, with rows for tokens,
//   outputs  O = scale (Qh S_0 + P U),   Qh_t = q_t (.) gamma_t,   P_ts = sum_i q_ti k_si gamma_ti / gamma_si (s <= t)
//   state    S_n = diag(gamma_{n-1}) S_0 + Kh^T U,   Kh_s = k_s (.) gamma_{n-1} / gamma_s.
// U = V for the linear and gated rules. For the delta rules the u_t depend on each other:
//   u_t = beta_t (v_t - S_0^T (k_t (.) gamma_t) - sum_{s<t} L_ts u_s),  L_ts = sum_i k_ti k_si gamma_ti / gamma_si,
// a unit lower triangular system (I + diag(beta) L) U = diag(beta) V - diag(beta) (K (.) gamma) S_0. Its
// solution is U = X_v - X_k S_0 with [X_v | X_k] = (I + diag(beta) L)^-1 [diag(beta) V | diag(beta) (K (.) gamma)],
// one triangular solve (the WY / UT form of DeltaNet and Gated DeltaNet).
//
// Decay ratios gamma_t / gamma_s are taken in a form that cannot overflow:
// - one decay per head: D_ts = exp(c_t - c_s) for s <= t, a matrix that scales P and L entrywise;
// - one per key dimension: the ratio sits inside the dot product, so it is split around the run's
//   first token, (q_t (.) e_t) . (k_s / e_s) with e_t = exp(c_t - c_0), and a run is cut into
//   pieces whose c_t - c_0 stays within kSpan: every factor then lies in [e^-kSpan, e^kSpan].
#include "chunked.hpp"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/kernels.hpp"
#include "kvfold/kvfold.hpp"
#include "platform.hpp"

namespace kvfold {
namespace {

constexpr float kSpan = 30;  // per-key decay: the widest range of c_t - c_0 within one piece

std::atomic<int64_t> chunk{32};

// Per-thread working memory, carved into the buffers of one piece; grows once, then never allocates.
class Arena {
   public:
    void reset(size_t need) {
        if (buf_.size() < need) buf_.resize(need);
        used_ = 0;
    }
    float* take(size_t n) {
        float* p = buf_.data() + used_;
        used_ += n;
        assert(used_ <= buf_.size());
        return p;
    }

   private:
    std::vector<float> buf_;
    size_t used_ = 0;
};

// Rows of a (rows x cols, lda apart) into columns of t (cols x rows, ldt apart).
// Eight rows at a time: a fixed count the compiler unrolls, so each element is one load and one
// store with no loop around it (a is small, in L1).
void transpose(const float* a, int64_t lda, int64_t rows, int64_t cols, float* t, int64_t ldt) {
    constexpr int64_t kRows = 8;
    int64_t r0 = 0;
    for (; r0 + kRows <= rows; r0 += kRows)
        for (int64_t c = 0; c < cols; ++c)
            for (int64_t r = 0; r < kRows; ++r) t[c * ldt + r0 + r] = a[(r0 + r) * lda + c];
    for (int64_t c = 0; c < cols; ++c)
        for (int64_t r = r0; r < rows; ++r) t[c * ldt + r] = a[r * lda + c];
}

void multiply(float* y, const float* a, const float* b, int64_t n) {  // y = a (.) b
    for (int64_t i = 0; i < n; ++i) y[i] = a[i] * b[i];
}

// c = a b as a Gemm; it requests a little of `ahead` per tile (see ChunkInput).
Gemm product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
             int64_t ldc, Requests* ahead) {
    Gemm g;
    g.m = m, g.n = n, g.k = k;
    g.a = a, g.lda = lda, g.b = b, g.ldb = ldb, g.c = c, g.ldc = ldc;
    g.ahead = ahead;
    return g;
}

// Keeps the lower triangle of an n x n matrix (strictly lower when `strict`), scaled entrywise by
// D when given; zeros the rest.
void keep_lower(float* m, int64_t n, const float* D, bool strict) {
    for (int64_t t = 0; t < n; ++t) {
        float* row = m + t * n;
        const int64_t end = strict ? t : t + 1;
        if (D)
            for (int64_t s = 0; s < end; ++s) row[s] *= D[t * n + s];
        for (int64_t s = end; s < n; ++s) row[s] = 0;
    }
}

// The decay of one piece in the forms the products use.
struct Decay {
    bool none = true, per_key = false;
    const float* gamma = nullptr;  // exp(c_t): n (per head) or n x d_k
    const float* D = nullptr;      // per head: exp(c_t - c_s), n x n, lower triangle
    const float* tail = nullptr;   // per head: exp(c_{n-1} - c_t), n
    const float* e = nullptr;      // per key: exp(c_t - c_0), n x d_k
};

Decay decay_forms(const ChunkInput& in, Arena& arena) {
    const Kernels& K = kernels();
    const int64_t n = in.n, dk = in.dk;
    Decay d;
    if (!in.decay) return d;
    d.none = false;
    d.per_key = in.decay_per_key;
    if (!d.per_key) {
        float* c = arena.take(n);
        float* gamma = arena.take(n);
        float* tail = arena.take(n);
        float* D = arena.take(n * n);
        double sum = 0;
        for (int64_t t = 0; t < n; ++t) c[t] = static_cast<float>(sum += in.decay[t]);
        K.exp_f32(gamma, c, n);
        for (int64_t t = 0; t < n; ++t) tail[t] = c[n - 1] - c[t];
        K.exp_f32(tail, tail, n);
        for (int64_t t = 0; t < n; ++t) {
            for (int64_t s = 0; s <= t; ++s) D[t * n + s] = c[t] - c[s];
            K.exp_f32(D + t * n, D + t * n, t + 1);
        }
        d.gamma = gamma, d.tail = tail, d.D = D;
        return d;
    }
    float* c = arena.take(n * dk);
    float* gamma = arena.take(n * dk);
    float* e = arena.take(n * dk);
    std::memcpy(c, in.decay, sizeof(float) * dk);
    for (int64_t t = 1; t < n; ++t)
        for (int64_t i = 0; i < dk; ++i) c[t * dk + i] = c[(t - 1) * dk + i] + in.decay[t * dk + i];
    K.exp_f32(gamma, c, n * dk);
    for (int64_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < dk; ++i) e[t * dk + i] = c[t * dk + i] - c[i];
    K.exp_f32(e, e, n * dk);
    d.gamma = gamma, d.e = e;
    return d;
}

// One piece of a run: n <= chunk_size() tokens, and for a per-key decay within kSpan.
void fold_piece(const ChunkInput& in, Arena& arena) {
    const Kernels& K = kernels();
    const int64_t n = in.n, dk = in.dk, dv = in.dv, ldk = in.k_row;
    arena.reset(static_cast<size_t>(4 * n * n + n * (12 * dk + 2 * dv + 20)));  // the most the takes below add up to
    const Decay d = decay_forms(in, arena);

    // Keys as the products want them: ks = k_s / e_s (per key; else k_s) and kt = ks^T (d_k x n);
    // kh, the keys that carry each token's update to the end of the piece (rows, used transposed).
    const float* ks = in.k;
    int64_t ldks = ldk;
    if (d.per_key) {
        float* div = arena.take(n * dk);
        for (int64_t t = 0; t < n; ++t)
            for (int64_t i = 0; i < dk; ++i) div[t * dk + i] = in.k[t * ldk + i] / d.e[t * dk + i];
        ks = div, ldks = dk;
    }
    float* kt = arena.take(dk * n);
    transpose(ks, ldks, n, dk, kt, n);
    const float* kh = in.k;
    int64_t ldkh = ldk;
    if (!d.none) {
        float* scaled = arena.take(n * dk);
        for (int64_t t = 0; t < n; ++t) {
            if (d.per_key)
                multiply(scaled + t * dk, ks + t * dk, d.e + (n - 1) * dk, dk);
            else
                for (int64_t i = 0; i < dk; ++i) scaled[t * dk + i] = d.tail[t] * in.k[t * ldk + i];
        }
        kh = scaled, ldkh = dk;
    }

    // U: V itself, or the delta rules' solved updates.
    const float* U = in.v;
    int64_t ldu = in.v_row;
    if (in.beta) {
        const int64_t ldx = dv + dk + 16;  // rows a cache line off a multiple of 4 KB apart: L1 sets stay apart
        const float* kq = in.k;            // k_t (.) e_t against ks: the per-key split of gamma_t / gamma_s
        int64_t ldkq = ldk;
        if (d.per_key) {
            float* m = arena.take(n * dk);
            for (int64_t t = 0; t < n; ++t) multiply(m + t * dk, in.k + t * ldk, d.e + t * dk, dk);
            kq = m, ldkq = dk;
        }
        float* L = arena.take(n * n);
        Gemm g = product(n, n, dk, kq, ldkq, kt, n, L, n, in.ahead);
        g.lower_c = true;
        K.gemm(g);
        keep_lower(L, n, d.D, true);
        float* X = arena.take(n * ldx);
        for (int64_t t = 0; t < n; ++t) {
            const float b = in.beta[t];
            const float* k = in.k + t * ldk;
            const float* v = in.v + t * in.v_row;
            float* xv = X + t * ldx;
            float* xk = xv + dv;
            for (int64_t s = 0; s < t; ++s) L[t * n + s] *= b;
            for (int64_t j = 0; j < dv; ++j) xv[j] = b * v[j];
            if (d.per_key)
                for (int64_t i = 0; i < dk; ++i) xk[i] = b * k[i] * d.gamma[t * dk + i];
            else {
                const float w = d.none ? b : b * d.gamma[t];
                for (int64_t i = 0; i < dk; ++i) xk[i] = w * k[i];
            }
        }
        K.solve_unit_lower(L, n, X, ldx, n, dv + dk);                          // the padding columns stay unread
        Gemm w = product(n, dv, dk, X + dv, ldx, in.S, dv, X, ldx, in.ahead);  // U = X_v - X_k S_0
        w.alpha = -1;
        w.accumulate = true;
        K.gemm(w);
        U = X;
        ldu = ldx;
    }

    // The queries, from S_0 and the piece's own tokens.
    float* P = arena.take(n * n);
    float* qe = d.per_key ? arena.take(n * dk) : nullptr;
    float* qg = d.per_key ? arena.take(n * dk) : nullptr;
    for (int64_t j = 0; j < in.nq; ++j) {
        const float* q = in.q + j * in.q_head;
        float* out = in.out + j * in.out_head;
        const float *q_scores = q, *q_state = q;  // q_t (.) e_t and q_t (.) gamma_t, per key
        int64_t ldq = in.q_row;
        if (d.per_key) {
            for (int64_t t = 0; t < n; ++t) {
                multiply(qe + t * dk, q + t * in.q_row, d.e + t * dk, dk);
                multiply(qg + t * dk, q + t * in.q_row, d.gamma + t * dk, dk);
            }
            q_scores = qe, q_state = qg, ldq = dk;
        }
        Gemm scores = product(n, n, dk, q_scores, ldq, kt, n, P, n, in.ahead);
        scores.lower_c = true;
        K.gemm(scores);
        keep_lower(P, n, d.D, false);
        Gemm past = product(n, dv, dk, q_state, ldq, in.S, dv, out, in.out_row, in.ahead);
        past.alpha = in.scale;
        K.gemm(past);
        if (!d.none && !d.per_key)
            for (int64_t t = 0; t < n; ++t) K.scale(out + t * in.out_row, d.gamma[t], dv);
        Gemm own = product(n, dv, n, P, n, U, ldu, out, in.out_row, in.ahead);
        own.alpha = in.scale;
        own.accumulate = true;
        own.lower_a = true;
        K.gemm(own);
        if (in.z)
            for (int64_t t = 0; t < n; ++t) {
                float den = K.dot_f32(q + t * in.q_row, in.z, dk) + in.eps;
                for (int64_t s = 0; s <= t; ++s) den += P[t * n + s];
                K.scale(out + t * in.out_row, 1.0f / den, dv);
            }
    }

    // The state at the end of the piece: S_n = diag(gamma_{n-1}) S_0 + Kh^T U (one decay per head:
    // the product scales S_0 as it adds, with no pass of its own over S).
    if (d.per_key)
        for (int64_t i = 0; i < dk; ++i) K.scale(in.S + i * dv, d.gamma[(n - 1) * dk + i], dv);
    Gemm update = product(dk, dv, n, kh, ldkh, U, ldu, in.S, dv, in.ahead);
    update.trans_a = true;
    update.accumulate = true;
    if (!d.none && !d.per_key) update.beta = d.gamma[n - 1];
    K.gemm(update);
    if (in.z)
        for (int64_t t = 0; t < n; ++t) K.axpy_f32(in.z, 1.0f, in.k + t * ldk, dk);
}

// Tokens [0, n) of a per-key decay run that the first piece takes: as many as keep c_t - c_0
// within kSpan in every key dimension (at least one).
int64_t piece_length(const ChunkInput& in, std::vector<double>& span) {
    const int64_t dk = in.dk;
    span.assign(static_cast<size_t>(dk), 0.0);
    for (int64_t t = 1; t < in.n; ++t)
        for (int64_t i = 0; i < dk; ++i) {
            span[i] += in.decay[t * dk + i];
            if (std::fabs(span[i]) > kSpan) return t;
        }
    return in.n;
}

}  // namespace

void fold_chunked(const ChunkInput& run) {
    thread_local Arena arena;
    thread_local std::vector<double> span;
    const int64_t step = chunk_size();
    for (int64_t first = 0; first < run.n;) {
        ChunkInput piece = run;
        piece.n = std::min(step, run.n - first);
        piece.k = run.k + first * run.k_row;
        piece.v = run.v + first * run.v_row;
        if (run.decay) piece.decay = run.decay + first * (run.decay_per_key ? run.dk : 1);
        if (run.beta) piece.beta = run.beta + first;
        if (run.nq) {
            piece.q = run.q + first * run.q_row;
            piece.out = run.out + first * run.out_row;
        }
        if (run.decay && run.decay_per_key) piece.n = piece_length(piece, span);
        fold_piece(piece, arena);
        first += piece.n;
    }
    if (run.ahead) run.ahead->rest();
}

int64_t chunk_size() { return chunk.load(std::memory_order_relaxed); }

void set_chunk_size(int64_t n) {
    if (n < 1 || n > kMaxChunk)
        throw ValueError("chunk_size: expected an integer in [1, " + std::to_string(kMaxChunk) + "], got " +
                         std::to_string(n));
    chunk.store(n, std::memory_order_relaxed);
}

int64_t get_chunk_size() { return chunk_size(); }

}  // namespace kvfold
