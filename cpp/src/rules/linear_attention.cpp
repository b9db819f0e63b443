// The linear-attention family, with ONNX LinearAttention's semantics. The memory is S (d_k x d_v)
// per lane, read linearly, o_t = scale q_t^T S_t; per token t:
//   linear:      S_t = S_{t-1} + k_t v_t^T
//   gated:       S_t = exp(g_t) S_{t-1} + k_t v_t^T
//   delta:       S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T
//   gated_delta: S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
// g is log-space, per KV head or per key dimension (exp(g) scales the rows of S); beta is per KV
// head. Each is either a constant of the rule, (H,) or (H, d_k) and a scalar or (H,), or comes
// with every token. `linear` also has the normalized form with a feature map phi:
//   S_t = S_{t-1} + phi(k_t) v_t^T,  z_t = z_{t-1} + phi(k_t),  o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)
// mix (scalar or (Hq,)) is the Infini-attention logit the cache uses when sinks or a window are
// read too. A decode step is one sweep over S: kernels().matrix_step updates and reads together; a
// block of tokens goes through fold_chunked (chunked.cpp) a chunk at a time.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../cache_checks.hpp"
#include "../chunked.hpp"
#include "../rule.hpp"
#include "../scratch.hpp"

namespace kvfold {
namespace {

enum class FeatureMap { identity, elu1, relu };

// The distance (in floats) between rows that sit evenly apart in memory, else 0; width for one row.
int64_t row_step(const float* const* rows, int64_t n, int64_t width) {
    if (n < 2) return width;
    const auto at = [&](int64_t i) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(rows[i])); };
    const int64_t step = at(1) - at(0);
    if (step <= 0 || step % static_cast<int64_t>(sizeof(float))) return 0;
    for (int64_t i = 2; i < n; ++i)
        if (at(i) - at(i - 1) != step) return 0;
    return step / static_cast<int64_t>(sizeof(float));
}

class LinearAttention final : public MatrixRule {
   public:
    struct Params {
        std::string kind;
        bool gated = false, delta = false;
        FeatureMap phi = FeatureMap::identity;
        bool normalize = false;
        float eps = 1e-6f;
        const Array* decay = nullptr;  // constants, or null when every token brings its own
        const Array* beta = nullptr;
        const Array* mix = nullptr;
    };

    explicit LinearAttention(const Params& p)
        : kind_(p.kind), gated_(p.gated), delta_(p.delta), phi_(p.phi), normalize_(p.normalize), eps_(p.eps) {
        if (p.decay) decay_spec_ = *p.decay;
        if (p.beta) beta_spec_ = *p.beta;
        if (p.mix) mix_spec_ = *p.mix;
        has_decay_ = p.decay != nullptr;
        has_beta_ = p.beta != nullptr;
    }

    void plan(const Dims& d) override {
        Rule::plan(d);
        add_buffer(S_, sizeof(float) * d.dk * d.dv);  // unchecked on load: finite pairs may sum past float32
        if (normalize_) add_buffer(z_, sizeof(float) * d.dk);
        if (has_decay_) plan_decay(d);
        if (has_beta_) {
            const Array& b = beta_spec_;
            if (!b.shape.empty() && b.shape != std::vector<int64_t>{d.heads})
                throw ValueError(kind_ + " rule: beta must be a scalar or of shape (H=" + std::to_string(d.heads) +
                                 ",), got " + shape_str(b.shape));
            for (int64_t h = 0; h < d.heads; ++h) beta_.push_back(static_cast<float>(b.data[b.shape.empty() ? 0 : h]));
        }
        const Array& m = mix_spec_;
        if (!m.shape.empty() && m.shape != std::vector<int64_t>{d.query_heads})
            throw ValueError(kind_ + " rule: mix must be a scalar or of shape (Hq=" + std::to_string(d.query_heads) +
                             ",), got " + shape_str(m.shape));
        for (int64_t h = 0; h < d.query_heads; ++h) {
            double logit = m.data.empty() ? 0.0 : m.data[m.shape.empty() ? 0 : h];
            weight_.push_back(static_cast<float>(1.0 / (1.0 + std::exp(-logit))));
        }
    }

    bool normalized() const override { return normalize_; }
    bool uses_decay() const override { return gated_; }
    bool uses_beta() const override { return delta_; }
    bool takes_decay() const override { return gated_ && !has_decay_; }
    bool takes_beta() const override { return delta_ && !has_beta_; }
    float memory_weight(int64_t hq) const override { return weight_[hq]; }
    float* matrix_state(int64_t lane) override { return S_.lane<float>(lane); }
    float* normalizer(int64_t lane) override { return normalize_ ? z_.lane<float>(lane) : nullptr; }

    void fold_read(int64_t lane, const float* k, const float* v, const TokenGate& gate,
                   const LaneQueries& qs) override {
        const int64_t dk = dims_.dk, h = lane % dims_.heads;
        float* tmp = scratch<LinearAttention>(static_cast<size_t>((2 + qs.count) * dk));  // exp(g) | phi(k) | phi(q)...
        MatrixPass m = pass(lane, qs, tmp + 2 * dk);
        if (gated_) set_decay(m, h, gate, tmp);
        if (delta_) {
            m.delta = true;
            m.beta = has_beta_ ? beta_[h] : *gate.beta;
        }
        m.k = features(k, tmp + dk);
        m.v = v;
        if (normalize_) kernels().axpy_f32(z_.lane<float>(lane), 1.0f, m.k, dk);
        kernels().matrix_step(m);
        if (normalize_) divide(lane, m);
    }

    // A run of pairs in the rows the chunked products take: keys and queries through the feature
    // map, gates with the rule's constants filled in. Rows already evenly spaced in memory (a
    // block's own tokens) are read where they are.
    void fold_read_run(int64_t lane, const FoldRun& run) override {
        const int64_t n = run.n, dk = dims_.dk, dv = dims_.dv, h = lane % dims_.heads, nq = run.qs.count;
        const bool identity = phi_ == FeatureMap::identity;
        bool per_key = has_decay_ && decay_per_key_;
        for (int64_t i = 0; gated_ && !has_decay_ && i < n; ++i) per_key |= run.gate[i].decay_per_key;
        const int64_t gate_width = gated_ ? (per_key ? dk : 1) : 0;
        const int64_t k_step = identity ? row_step(run.k, n, dk) : 0, v_step = row_step(run.v, n, dv);
        // scratch: keys | values (when copied) | log decays | betas | queries (through phi)
        const int64_t k_floats = k_step ? 0 : n * dk, v_floats = v_step ? 0 : n * dv,
                      q_floats = identity ? 0 : nq * n * dk;
        float* k = scratch<LinearAttention>(static_cast<size_t>(k_floats + v_floats + n * (gate_width + 1) + q_floats));
        float* v = k + k_floats;
        float* g = v + v_floats;
        float* b = g + n * gate_width;
        float* q = b + n;
        for (int64_t i = 0; i < n; ++i) {
            if (!k_step && features(run.k[i], k + i * dk) == run.k[i])
                std::memcpy(k + i * dk, run.k[i], sizeof(float) * dk);
            if (!v_step) std::memcpy(v + i * dv, run.v[i], sizeof(float) * dv);
            if (gated_) log_decay(h, run.gate[i], per_key, g + i * gate_width);
            if (delta_) b[i] = has_beta_ ? beta_[h] : *run.gate[i].beta;
        }
        ChunkInput in;
        in.n = n, in.dk = dk, in.dv = dv;
        in.k = k_step ? run.k[0] : k, in.k_row = k_step ? k_step : dk;
        in.v = v_step ? run.v[0] : v, in.v_row = v_step ? v_step : dv;
        if (gated_) in.decay = g, in.decay_per_key = per_key;
        if (delta_) in.beta = b;
        in.nq = nq;
        if (nq) {
            in.q = run.qs.q, in.q_head = run.qs.q_stride, in.q_row = run.q_step;
            if (!identity) {
                for (int64_t j = 0; j < nq; ++j)
                    for (int64_t i = 0; i < n; ++i)
                        features(run.qs.q + j * run.qs.q_stride + i * run.q_step, q + (j * n + i) * dk);
                in.q = q, in.q_head = n * dk, in.q_row = dk;
            }
            in.out = run.qs.out, in.out_head = run.qs.out_stride, in.out_row = run.out_step;
        }
        in.scale = normalize_ ? 1.0f : run.qs.scale;
        in.S = S_.lane<float>(lane);
        if (normalize_) in.z = z_.lane<float>(lane), in.eps = eps_;
        in.ahead = run.ahead;
        fold_chunked(in);
    }

    void read(int64_t lane, const LaneQueries& qs) const override {
        float* tmp = scratch<LinearAttention>(static_cast<size_t>(qs.count * dims_.dk));
        MatrixPass m = const_cast<LinearAttention*>(this)->pass(lane, qs, tmp);
        kernels().matrix_read(m);
        if (normalize_) divide(lane, m);
    }

   private:
    void plan_decay(const Dims& d) {
        const Array& g = decay_spec_;
        if (g.shape == std::vector<int64_t>{d.heads})
            decay_per_key_ = false;
        else if (g.shape == std::vector<int64_t>{d.heads, d.dk})
            decay_per_key_ = true;
        else
            throw ValueError(kind_ + " rule: decay must have shape (H=" + std::to_string(d.heads) +
                             ",) or (H=" + std::to_string(d.heads) + ", d_k=" + std::to_string(d.dk) + "), got " +
                             shape_str(g.shape));
        for (double x : g.data) {
            decay_.push_back(static_cast<float>(std::exp(x)));
            log_decay_.push_back(static_cast<float>(x));
        }
    }

    // The sweep's memory and queries; phi(q) goes to qbuf when the feature map is not the identity.
    MatrixPass pass(int64_t lane, const LaneQueries& qs, float* qbuf) {
        MatrixPass m;
        m.S = S_.lane<float>(lane);
        if (lane + 1 < dims_.lanes) m.next = S_.lane<float>(lane + 1);  // lanes go in order
        m.dk = dims_.dk;
        m.dv = m.ld = dims_.dv;
        m.nq = qs.count;
        m.q = qs.q;
        m.q_stride = qs.q_stride;
        if (phi_ != FeatureMap::identity) {
            for (int64_t j = 0; j < qs.count; ++j) features(qs.q + j * qs.q_stride, qbuf + j * dims_.dk);
            m.q = qbuf;
            m.q_stride = dims_.dk;
        }
        m.out = qs.out;
        m.out_stride = qs.out_stride;
        m.scale = normalize_ ? 1.0f : qs.scale;
        return m;
    }

    void set_decay(MatrixPass& m, int64_t h, const TokenGate& gate, float* factors) const {
        const int64_t dk = dims_.dk;
        if (has_decay_) {
            if (decay_per_key_)
                m.decay = &decay_[h * dk];
            else
                m.decay0 = decay_[h];
        } else if (gate.decay_per_key) {
            kernels().exp_f32(factors, gate.decay, dk);
            m.decay = factors;
        } else {
            m.decay0 = std::exp(*gate.decay);
        }
    }

    // A token's log decay: d_k values when per_key (a head's one value repeated), else one.
    void log_decay(int64_t h, const TokenGate& gate, bool per_key, float* out) const {
        const int64_t dk = dims_.dk;
        const float* from = has_decay_ ? &log_decay_[decay_per_key_ ? h * dk : h] : gate.decay;
        const bool from_per_key = has_decay_ ? decay_per_key_ : gate.decay_per_key;
        if (!per_key)
            out[0] = from[0];
        else if (from_per_key)
            std::memcpy(out, from, sizeof(float) * dk);
        else
            std::fill(out, out + dk, from[0]);
    }

    // phi(x) into buf (or x itself for the identity).
    const float* features(const float* x, float* buf) const {
        const int64_t n = dims_.dk;
        switch (phi_) {
            case FeatureMap::identity: return x;
            case FeatureMap::elu1:
                for (int64_t i = 0; i < n; ++i) buf[i] = x[i] > 0 ? x[i] + 1.0f : std::exp(x[i]);
                return buf;
            case FeatureMap::relu:
                for (int64_t i = 0; i < n; ++i) buf[i] = x[i] > 0 ? x[i] : 0.0f;
                return buf;
        }
        return x;
    }

    // Normalized read: out_j /= phi(q_j)^T z + eps.
    void divide(int64_t lane, const MatrixPass& m) const {
        const float* z = z_.lane<float>(lane);
        for (int64_t j = 0; j < m.nq; ++j) {
            float den = kernels().dot_f32(m.q + j * m.q_stride, z, dims_.dk) + eps_;
            kernels().scale(m.out + j * m.out_stride, 1.0f / den, dims_.dv);
        }
    }

    std::string kind_;
    bool gated_, delta_;
    FeatureMap phi_;
    bool normalize_;
    float eps_;
    Array decay_spec_, beta_spec_, mix_spec_;
    bool has_decay_ = false, has_beta_ = false, decay_per_key_ = false;
    std::vector<float> decay_, log_decay_;  // exp(g) and g, per head or head x key
    std::vector<float> beta_, weight_;      // beta per head; sigmoid(mix) per query head
    LaneBuffer S_, z_;
};

const Array* optional_param(const RuleSpec& spec, const char* name) {
    auto it = spec.arrays.find(name);
    if (it == spec.arrays.end()) return nullptr;
    const Array& a = it->second;
    for (size_t i = 0; i < a.data.size(); ++i)
        if (!std::isfinite(a.data[i]))
            throw ValueError(spec.kind + " rule: " + name + " must be finite, got " + number_str(a.data[i]) +
                             " at flat index " + std::to_string(i));
    return &a;
}

void check_values(const RuleSpec& spec, const char* name, const Array* a, double lo, double hi, const char* why) {
    for (size_t i = 0; a && i < a->data.size(); ++i)
        if (!(a->data[i] >= lo && a->data[i] <= hi))
            throw ValueError(spec.kind + " rule: " + name + " must be " + (lo == -DBL_MAX ? "<= 0" : "in [0, 2]") +
                             " (" + why + "), got " + number_str(a->data[i]) + " at flat index " + std::to_string(i));
}

void check_rank(const RuleSpec& spec, const char* name, const Array* a, size_t max_rank, const char* expected) {
    if (a && (a->shape.size() > max_rank || a->data.empty()))
        throw ValueError(spec.kind + " rule: " + name + " must be " + expected + ", got shape " + shape_str(a->shape));
}

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    LinearAttention::Params p;
    p.kind = spec.kind;
    p.gated = spec.kind == "gated" || spec.kind == "gated_delta";
    p.delta = spec.kind == "delta" || spec.kind == "gated_delta";
    p.decay = optional_param(spec, "decay");
    p.beta = optional_param(spec, "beta");
    p.mix = optional_param(spec, "mix");
    check_values(spec, "decay", p.decay, -DBL_MAX, 0, kDecayRange);
    check_values(spec, "beta", p.beta, 0, 2, kBetaRange);
    check_rank(spec, "decay", p.decay, 2, "of shape (H,) or (H, d_k)");
    if (p.decay && p.decay->shape.empty())
        throw ValueError(spec.kind + " rule: decay must be of shape (H,) or (H, d_k), got a scalar");
    check_rank(spec, "beta", p.beta, 1, "a scalar or of shape (H,)");
    check_rank(spec, "mix", p.mix, 1, "a scalar or of shape (Hq,)");
    if (spec.kind == "linear") {
        std::string phi = option(spec, "feature_map", {"identity", "elu1", "relu"});
        p.phi = phi == "elu1" ? FeatureMap::elu1 : phi == "relu" ? FeatureMap::relu : FeatureMap::identity;
        p.normalize = option(spec, "normalize", {"false", "true"}) == "true";
        if (spec.arrays.count("eps")) {
            double eps = scalar_param(spec, "eps");
            if (!(eps > 0 && eps < 1e30))
                throw ValueError("linear rule: eps must be a finite number > 0, got " + std::to_string(eps));
            p.eps = static_cast<float>(eps);
        }
    }
    return std::make_unique<LinearAttention>(p);
}

}  // namespace

extern const RuleKind linear_rule{"linear", {"mix", "eps"}, {"feature_map", "normalize"}, make};
extern const RuleKind gated_rule{"gated", {"decay", "mix"}, {}, make};
extern const RuleKind delta_rule{"delta", {"beta", "mix"}, {}, make};
extern const RuleKind gated_delta_rule{"gated_delta", {"decay", "beta", "mix"}, {}, make};

}  // namespace kvfold
