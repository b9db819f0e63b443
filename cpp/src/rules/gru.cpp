// GRU(weight_ih, weight_hh, bias_ih, bias_hh): a recurrent network as the memory. One slot holds
// h = concat(mem_k, mem_v); each folded pair x = concat(k, v) updates it by torch.nn.GRUCell's
// equations, weight layout and gate order (r, z, n), with D = d_k + d_v:
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
//   z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
//   h' = (1 - z) * n + z * h
// weight_ih and weight_hh are (3D, D), shared by every KV head, or (H, 3D, D), one set per head;
// biases (3D,) or (H, 3D), zero when not given. h starts at zero.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../cache_checks.hpp"
#include "../rule.hpp"
#include "../scratch.hpp"

namespace kvfold {
namespace {

// tanh(u) from e = exp(-2 |u|): (1 - e) / (1 + e) with u's sign, which loses digits to the
// subtraction near 0, where the series takes over (its first omitted term is below 2e-10 there).
float tanh_from(float u, float e) {
    const float a = std::fabs(u);
    if (a < 0.125f) {
        const float u2 = u * u;
        return u * (1.0f + u2 * (-1.0f / 3 + u2 * (2.0f / 15 + u2 * (-17.0f / 315))));
    }
    return std::copysign((1.0f - e) / (1.0f + e), u);
}

class GRU final : public SlotRule {
   public:
    // sets: 0 when the weights are shared by every head, else the number of per-head sets.
    GRU(int64_t D, int64_t sets, const std::vector<float>& w_ih, const std::vector<float>& w_hh,
        std::vector<float> b_ih, std::vector<float> b_hh, std::vector<int64_t> shape)
        : D_(D),
          sets_(sets),
          w_ih_(packed(w_ih)),
          w_hh_(packed(w_hh)),
          b_ih_(std::move(b_ih)),
          b_hh_(std::move(b_hh)),
          shape_(std::move(shape)) {}

    void plan(const Dims& d) override {
        Rule::plan(d);
        if (D_ != d.dk + d.dv) {
            std::string want = "(" + std::string(sets_ ? "H, " : "") + std::to_string(3 * (d.dk + d.dv)) + ", " +
                               std::to_string(d.dk + d.dv) + ")";
            throw ValueError("gru rule: weight_ih must be " + want + " for head_dim=" + std::to_string(d.dk) +
                             " + value_dim=" + std::to_string(d.dv) + ", got " + shape_str(shape_));
        }
        if (sets_ && sets_ != d.heads)
            throw ValueError("gru rule: per-head weights need one set per KV head (H=" + std::to_string(d.heads) +
                             "), got weight_ih of shape " + shape_str(shape_));
        plan_slots(1);
    }

    void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) override {
        fold_lanes(LaneFolds{1, &lane, &k, &v, &count, &position});
    }

    // The lanes of each weight set in one matrix product: [lanes x D] by W^T, the weights read once.
    void fold_lanes(const LaneFolds& f) override {
        if (!sets_) return fold_set(0, f.n, f.lane, f.k, f.v);
        thread_local std::vector<int64_t> lanes;
        thread_local std::vector<const float*> rows;
        lanes.resize(f.n);
        rows.resize(2 * f.n);
        for (int64_t set = 0; set < sets_; ++set) {
            int64_t m = 0;
            for (int64_t i = 0; i < f.n; ++i)
                if (f.lane[i] % dims_.heads == set) lanes[m] = f.lane[i], rows[m] = f.k[i], rows[f.n + m] = f.v[i], ++m;
            if (m) fold_set(set, m, lanes.data(), rows.data(), rows.data() + f.n);
        }
    }
    int64_t max_slots() const override { return 1; }
    bool slots_are_state() const override { return true; }

   private:
    // Columns of W^T per panel: a panel (D rows of its columns) is stored whole, so that the matrix
    // product streams it in order.
    static constexpr int64_t kPanel = 32;

    // Each (3D, D) set of w as W^T (D, 3D) in panels of kPanel columns (the last one narrower).
    std::vector<float> packed(const std::vector<float>& w) const {
        const int64_t D = D_, G = 3 * D;
        std::vector<float> out(w.size());
        for (size_t base = 0; base < w.size(); base += static_cast<size_t>(G * D))
            for (int64_t j0 = 0; j0 < G; j0 += kPanel) {
                const int64_t width = std::min(kPanel, G - j0);
                float* panel = out.data() + base + j0 * D;
                for (int64_t p = 0; p < D; ++p)
                    for (int64_t j = 0; j < width; ++j) panel[p * width + j] = w[base + (j0 + j) * D + p];
            }
        return out;
    }

    // c (m x 3D, rows 3D apart) = a (m x D) W^T for weight set `set` of w (packed).
    void product(float* c, const float* a, int64_t m, const std::vector<float>& w, int64_t set) const {
        const int64_t D = D_, G = 3 * D;
        for (int64_t j0 = 0; j0 < G; j0 += kPanel) {
            Gemm g;
            g.m = m, g.n = std::min(kPanel, G - j0), g.k = D;
            g.a = a, g.lda = D;
            g.b = w.data() + set * G * D + j0 * D, g.ldb = g.n;
            g.c = c + j0, g.ldc = G;
            kernels().gemm(g);
        }
    }

    // m lanes of one weight set, lane[i] taking x = concat(k[i], v[i]).
    void fold_set(int64_t set, int64_t m, const int64_t* lane, const float* const* k, const float* const* v) {
        const int64_t D = D_, G = 3 * D, dk = dims_.dk, dv = dims_.dv;
        float* x = scratch<GRU>(static_cast<size_t>(m * (2 * D + 2 * G) + 4 * D));  // x | h | W_ih x | W_hh h | e
        float* h = x + m * D;
        float* gi = h + m * D;
        float* gh = gi + m * G;
        float* e = gh + m * G;
        for (int64_t i = 0; i < m; ++i) {
            std::memcpy(x + i * D, k[i], sizeof(float) * dk);
            std::memcpy(x + i * D + dk, v[i], sizeof(float) * dv);
            std::memcpy(h + i * D, state_keys(lane[i]), sizeof(float) * dk);
            std::memcpy(h + i * D + dk, state_values(lane[i]), sizeof(float) * dv);
        }
        product(gi, x, m, w_ih_, set);
        product(gh, h, m, w_hh_, set);
        for (int64_t i = 0; i < m; ++i) cell(lane[i], set, gi + i * G, gh + i * G, h + i * D, e);
    }

    // The gates of one lane from its products (without biases) and h, and the new h into its slot;
    // e is 4D floats of scratch.
    void cell(int64_t lane, int64_t set, const float* gi, const float* gh, const float* h, float* e) {
        const Kernels& K = kernels();
        const int64_t D = D_, dk = dims_.dk;
        const float* bi = b_ih_.data() + set * 3 * D;
        const float* bh = b_hh_.data() + set * 3 * D;
        float* u = e + 2 * D;  // the argument of tanh
        float* t = u + D;      // exp(-2 |u|)
        for (int64_t i = 0; i < 2 * D; ++i) e[i] = -((gi[i] + bi[i]) + (gh[i] + bh[i]));
        K.exp_f32(e, e, 2 * D);  // r = 1 / (1 + e[i]), z = 1 / (1 + e[D + i])
        for (int64_t i = 0; i < D; ++i) {
            const float r = 1.0f / (1.0f + e[i]);
            u[i] = (gi[2 * D + i] + bi[2 * D + i]) + r * (gh[2 * D + i] + bh[2 * D + i]);
            t[i] = -2.0f * std::fabs(u[i]);
        }
        K.exp_f32(t, t, D);
        float* mk = state_keys(lane);
        float* mv = state_values(lane);
        for (int64_t i = 0; i < D; ++i) {
            const float z = 1.0f / (1.0f + e[D + i]), n = tanh_from(u[i], t[i]);
            (i < dk ? mk[i] : mv[i - dk]) = (1.0f - z) * n + z * h[i];
        }
    }

    int64_t D_, sets_;
    std::vector<float> w_ih_, w_hh_, b_ih_, b_hh_;  // weights packed for product()
    std::vector<int64_t> shape_;
};

std::vector<float> finite_floats(const char* name, const Array& a) {
    std::vector<float> out(a.data.size());
    for (size_t i = 0; i < a.data.size(); ++i) {
        if (!std::isfinite(a.data[i]) || std::fabs(a.data[i]) > 3.4e38)
            throw ValueError(std::string("gru rule: ") + name + " must be finite float32 values, got " +
                             number_str(a.data[i]) + " at flat index " + std::to_string(i));
        out[i] = static_cast<float>(a.data[i]);
    }
    return out;
}

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    for (const auto& [name, a] : spec.arrays)
        if (name != "weight_ih" && name != "weight_hh" && name != "bias_ih" && name != "bias_hh")
            throw ValueError("gru rule: takes no parameter '" + name + "'");
    const Array& w_ih = param(spec, "weight_ih");
    const Array& w_hh = param(spec, "weight_hh");
    const auto& s = w_ih.shape;
    if ((s.size() != 2 && s.size() != 3) || s.back() < 2 || s[s.size() - 2] != 3 * s.back() ||
        (s.size() == 3 && s[0] < 1))
        throw ValueError(
            "gru rule: weight_ih must have shape (3*D, D) or (H, 3*D, D) with D = head_dim + value_dim, "
            "got " +
            shape_str(s));
    if (w_hh.shape != s)
        throw ValueError("gru rule: weight_hh must have the shape of weight_ih " + shape_str(s) + ", got " +
                         shape_str(w_hh.shape));
    const int64_t D = s.back(), sets = s.size() == 3 ? s[0] : 0;
    std::vector<int64_t> bias_shape = sets ? std::vector<int64_t>{sets, 3 * D} : std::vector<int64_t>{3 * D};
    std::vector<float> biases[2];
    const char* names[2] = {"bias_ih", "bias_hh"};
    for (int i = 0; i < 2; ++i) {
        auto it = spec.arrays.find(names[i]);
        if (it == spec.arrays.end()) {
            biases[i].assign(static_cast<size_t>((sets ? sets : 1) * 3 * D), 0.0f);
            continue;
        }
        if (it->second.shape != bias_shape)
            throw ValueError(std::string("gru rule: ") + names[i] + " must have shape " + shape_str(bias_shape) +
                             " to match weight_ih " + shape_str(s) + ", got " + shape_str(it->second.shape));
        biases[i] = finite_floats(names[i], it->second);
    }
    return std::make_unique<GRU>(D, sets, finite_floats("weight_ih", w_ih), finite_floats("weight_hh", w_hh),
                                 std::move(biases[0]), std::move(biases[1]), s);
}
}  // namespace

extern const RuleKind gru_rule{"gru", {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}, {}, make};

}  // namespace kvfold
