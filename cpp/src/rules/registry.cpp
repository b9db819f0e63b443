// The rule kinds kvfold knows, and parameter access for their constructors.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../cache_checks.hpp"
#include "../rule.hpp"

namespace kvfold {

// Every kind kvfold knows, each declared in its rule's file: the build lists them in rule_kinds.inc
// (see CMakeLists.txt), one KVFOLD_RULE(name) a kind.
#define KVFOLD_RULE(kind) extern const RuleKind kind;
#include "rule_kinds.inc"
#undef KVFOLD_RULE

namespace {

const RuleKind* const kinds[] = {
#define KVFOLD_RULE(kind) &kind,
#include "rule_kinds.inc"
#undef KVFOLD_RULE
};

std::string joined(const NameList& names) {
    std::string out;
    for (const char* n : names) out += (out.empty() ? "'" : ", '") + std::string(n) + "'";
    return out.empty() ? "none" : out;
}

// A spec carries only the keys its kind declares: a stray one (a typo, a newer version's parameter
// in saved state) is refused rather than ignored.
template <class Map>
void check_keys(const RuleKind& kind, const Map& given, const NameList& known, const char* what) {
    for (const auto& item : given)
        if (std::find(known.begin(), known.end(), item.first) == known.end())
            throw ValueError(std::string(kind.name) + " rule: takes no " + what + " '" + item.first + "' (its " + what +
                             "s: " + joined(known) + ")");
}

}  // namespace

std::unique_ptr<Rule> make_rule(const RuleSpec& spec) {
    for (const RuleKind* k : kinds)
        if (spec.kind == k->name) {
            check_keys(*k, spec.arrays, k->params, "parameter");
            check_keys(*k, spec.options, k->options, "option");
            return k->make(spec);
        }
    std::string names;
    for (const RuleKind* k : kinds) names += (names.empty() ? "" : ", ") + std::string(k->name);
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
        throw ValueError(spec.kind + " rule: " + name + " must be finite, got " + number_str(a.data[0]));
    return a.data[0];
}

int64_t int_param(const RuleSpec& spec, const char* name, int64_t lo, int64_t hi) {
    double x = scalar_param(spec, name);
    if (x != std::floor(x) || x < static_cast<double>(lo) || x > static_cast<double>(hi))
        throw ValueError(
            spec.kind + " rule: " + name + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
            "], got " +
            (x == std::floor(x) && std::fabs(x) < 0x1p62 ? std::to_string(static_cast<int64_t>(x)) : number_str(x)));
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
