// The rule kinds kvfold knows, and parameter access for their constructors.
#include <cmath>
#include <limits>

#include "../rule.hpp"

namespace kvfold {

std::unique_ptr<Rule> make_drop(const RuleSpec&);
std::unique_ptr<Rule> make_cumulative(const RuleSpec&);
std::unique_ptr<Rule> make_moving(const RuleSpec&);
std::unique_ptr<Rule> make_weighted(const RuleSpec&);
std::unique_ptr<Rule> make_ema(const RuleSpec&);
std::unique_ptr<Rule> make_compressive(const RuleSpec&);
std::unique_ptr<Rule> make_merge(const RuleSpec&);
std::unique_ptr<Rule> make_gru(const RuleSpec&);
std::unique_ptr<Rule> make_linear_attention(const RuleSpec&);
std::unique_ptr<Rule> make_custom(const RuleSpec&);

namespace {
struct Kind {
    const char* name;
    std::unique_ptr<Rule> (*make)(const RuleSpec&);
};
const Kind kinds[] = {
    {"drop", make_drop},
    {"cumulative", make_cumulative},
    {"moving", make_moving},
    {"weighted", make_weighted},
    {"ema", make_ema},
    {"compressive", make_compressive},
    {"gru", make_gru},
    {"merge", make_merge},
    {"linear", make_linear_attention},
    {"gated", make_linear_attention},
    {"delta", make_linear_attention},
    {"gated_delta", make_linear_attention},
    {"custom", make_custom},
};
}  // namespace

std::unique_ptr<Rule> make_rule(const RuleSpec& spec) {
    for (const Kind& k : kinds)
        if (spec.kind == k.name) return k.make(spec);
    std::string names;
    for (const Kind& k : kinds) names += (names.empty() ? "" : ", ") + std::string(k.name);
    throw ValueError("rule: expected one of " + names + ", got '" + spec.kind + "'");
}

void check_rule(const RuleSpec& spec) { make_rule(spec); }

const Array& param(const RuleSpec& spec, const char* name) {
    auto it = spec.arrays.find(name);
    if (it == spec.arrays.end()) throw ValueError(spec.kind + " rule: missing parameter '" + std::string(name) + "'");
    return it->second;
}

double scalar_param(const RuleSpec& spec, const char* name) {
    const Array& a = param(spec, name);
    if (!a.shape.empty() || a.data.size() != 1)
        throw ValueError(spec.kind + " rule: " + name + " must be a scalar, got an array of " +
                         std::to_string(a.data.size()) + " values");
    if (!std::isfinite(a.data[0]))
        throw ValueError(spec.kind + " rule: " + name + " must be finite, got " + std::to_string(a.data[0]));
    return a.data[0];
}

int64_t int_param(const RuleSpec& spec, const char* name, int64_t lo, int64_t hi) {
    double x = scalar_param(spec, name);
    if (x != std::floor(x) || x < static_cast<double>(lo) || x > static_cast<double>(hi))
        throw ValueError(spec.kind + " rule: " + name + " must be an integer in [" + std::to_string(lo) + ", " +
                         std::to_string(hi) + "], got " + std::to_string(x));
    return static_cast<int64_t>(x);
}

std::string option(const RuleSpec& spec, const char* name, const std::vector<std::string>& allowed) {
    auto it = spec.options.find(name);
    std::string value = it == spec.options.end() ? allowed.front() : it->second;
    for (const auto& a : allowed)
        if (a == value) return value;
    std::string names;
    for (const auto& a : allowed) names += (names.empty() ? "'" : ", '") + a + "'";
    throw ValueError(spec.kind + " rule: " + name + " must be one of " + names + ", got '" + value + "'");
}

}  // namespace kvfold
