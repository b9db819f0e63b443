// GRU(weight_ih, weight_hh, bias_ih, bias_hh): a recurrent network as the memory. One slot holds
// h = concat(mem_k, mem_v); each folded pair x = concat(k, v) updates it by torch.nn.GRUCell's
// equations, weight layout and gate order (r, z, n), with D = d_k + d_v:
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
//   z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
//   h' = (1 - z) * n + z * h
// weight_ih and weight_hh are (3D, D), shared by every KV head, or (H, 3D, D), one set per head;
// biases (3D,) or (H, 3D), zero when not given. h starts at zero.
#include <cmath>
#include <cstring>
#include <vector>

#include "../rule.hpp"
#include "../scratch.hpp"

namespace kvfold {
namespace {

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

class GRU final : public SlotRule {
   public:
    // sets: 0 when the weights are shared by every head, else the number of per-head sets.
    GRU(int64_t D, int64_t sets, std::vector<float> w_ih, std::vector<float> w_hh, std::vector<float> b_ih,
        std::vector<float> b_hh, std::vector<int64_t> shape)
        : D_(D),
          sets_(sets),
          w_ih_(std::move(w_ih)),
          w_hh_(std::move(w_hh)),
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

    void fold(int64_t lane, const float* k, const float* v, int64_t, int64_t) override {
        const Kernels& K = kernels();
        const int64_t D = D_, dk = dims_.dk, dv = dims_.dv, set = sets_ ? lane % dims_.heads : 0;
        float* x = scratch<GRU>(static_cast<size_t>(8 * D));  // x | h | W_ih x | W_hh h
        float* h = x + D;
        float* gi = h + D;
        float* gh = gi + 3 * D;
        std::memcpy(x, k, sizeof(float) * dk);
        std::memcpy(x + dk, v, sizeof(float) * dv);
        std::memcpy(h, state_keys(lane), sizeof(float) * dk);
        std::memcpy(h + dk, state_values(lane), sizeof(float) * dv);
        K.gemv(gi, w_ih_.data() + set * 3 * D * D, x, 3 * D, D);
        K.gemv(gh, w_hh_.data() + set * 3 * D * D, h, 3 * D, D);
        K.axpy_f32(gi, 1.0f, b_ih_.data() + set * 3 * D, 3 * D);
        K.axpy_f32(gh, 1.0f, b_hh_.data() + set * 3 * D, 3 * D);
        float* mk = state_keys(lane);
        float* mv = state_values(lane);
        for (int64_t i = 0; i < D; ++i) {
            float r = sigmoid(gi[i] + gh[i]);
            float z = sigmoid(gi[D + i] + gh[D + i]);
            float n = std::tanh(gi[2 * D + i] + r * gh[2 * D + i]);
            float next = (1.0f - z) * n + z * h[i];
            (i < dk ? mk[i] : mv[i - dk]) = next;
        }
    }
    int64_t max_slots() const override { return 1; }
    bool slots_are_state() const override { return true; }

   private:
    int64_t D_, sets_;
    std::vector<float> w_ih_, w_hh_, b_ih_, b_hh_;
    std::vector<int64_t> shape_;
};

std::vector<float> finite_floats(const char* name, const Array& a) {
    std::vector<float> out(a.data.size());
    for (size_t i = 0; i < a.data.size(); ++i) {
        if (!std::isfinite(a.data[i]) || std::fabs(a.data[i]) > 3.4e38)
            throw ValueError(std::string("gru rule: ") + name + " must be finite float32 values, got " +
                             std::to_string(a.data[i]) + " at flat index " + std::to_string(i));
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
