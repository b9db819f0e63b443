// The arguments of MemoryCache's methods (cache_args.hpp).
#include "cache_args.hpp"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace kvfold_py {

using kvfold::MemoryCache;

Tokens read_tokens(const MemoryCache& c, const py::handle& k_obj, const py::handle& v_obj) {
    const auto& g = c.config();
    Tokens t{as_floats("k", k_obj), as_floats("v", v_obj), 0, false};
    int64_t tk = check_tokens("k", t.k, g.batch_size, g.num_heads, g.head_dim, "H", "d_k");
    int64_t tv = check_tokens("v", t.v, g.batch_size, g.num_heads, g.value_dim, "H", "d_v");
    if ((tk == 0) != (tv == 0) || tk != tv)
        throw kvfold::ValueError("v: expected the same tokens as k " + shape_str(shape_of(t.k)) + ", got shape " +
                                 shape_str(shape_of(t.v)));
    t.single = tk == 0;
    t.T = t.single ? 1 : tk;
    return t;
}

Gates read_gates(const MemoryCache& c, const py::object& decay, const py::object& beta, const Tokens& t) {
    if (decay.is_none() && beta.is_none()) return {};  // the common case costs nothing
    const auto& g = c.config();
    std::vector<int64_t> head{g.batch_size, g.num_heads};
    std::string want = "(B=" + std::to_string(g.batch_size) + ", H=" + std::to_string(g.num_heads);
    if (!t.single) {
        head.push_back(t.T);
        want += ", T=" + std::to_string(t.T);
    }
    std::vector<int64_t> key = head;
    key.push_back(g.head_dim);
    const std::string per = t.single ? " for one token" : " for a block";
    Gates out;
    if (!decay.is_none()) {
        FloatArray a = as_floats("decay", decay);
        auto s = shape_of(a);
        if (s != head && s != key)
            throw kvfold::ValueError("decay: expected shape " + want + ") per head or " + want +
                                     ", d_k=" + std::to_string(g.head_dim) + ") per key dimension" + per + ", got " +
                                     shape_str(s));
        out.view.decay = a.data();
        out.view.decay_per_key = s == key;
        out.decay = std::move(a);
    }
    if (!beta.is_none()) {
        FloatArray a = as_floats("beta", beta);
        if (shape_of(a) != head)
            throw kvfold::ValueError("beta: expected shape " + want + ")" + per + ", got " + shape_str(shape_of(a)));
        out.view.beta = a.data();
        out.beta = std::move(a);
    }
    return out;
}

const int64_t* read_positions(const MemoryCache& c, const py::object& obj, const Tokens& t, PositionArray& keep) {
    if (obj.is_none()) return nullptr;
    py::array a = py::array::ensure(obj);
    if (!a) throw kvfold::TypeError("positions: expected an array of integers, got " + type_name(obj));
    const char kind = a.dtype().kind();
    if (kind != 'i' && kind != 'u')
        throw kvfold::TypeError("positions: expected integers, got dtype " + std::string(py::str(a.dtype())));
    const int64_t B = c.config().batch_size;
    std::vector<int64_t> want{B};
    if (!t.single) want.push_back(t.T);
    if (shape_of(a) != want)
        throw kvfold::ValueError("positions: expected shape " + shape_str(want) +
                                 (t.single ? " for one token" : " for a block") + ", got " + shape_str(shape_of(a)));
    if (kind == 'u' && a.itemsize() == 8) {  // the cast to int64 would wrap the largest ones round
        const auto u = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
        for (py::ssize_t i = 0; i < u.size(); ++i)
            if (u.data()[i] > static_cast<uint64_t>(INT64_MAX))
                throw kvfold::ValueError("positions: expected integers up to 2^63 - 1, got " +
                                         std::to_string(u.data()[i]));
    }
    keep = PositionArray::ensure(a);
    if (!keep) throw kvfold::TypeError("positions: expected integers that int64 holds");
    return keep.data();
}

FloatArray read_query(const MemoryCache& c, const py::handle& q_obj) {
    const auto& g = c.config();
    FloatArray q = as_floats("q", q_obj);
    if (!shape_is(q, {g.batch_size, g.num_query_heads, g.head_dim}))
        throw kvfold::ValueError("q: expected shape (B=" + std::to_string(g.batch_size) +
                                 ", Hq=" + std::to_string(g.num_query_heads) + ", d_k=" + std::to_string(g.head_dim) +
                                 "), got " + shape_str(shape_of(q)));
    return q;
}

Output output(const MemoryCache& c, const py::object& out) {
    const auto& g = c.config();
    if (out.is_none()) {
        py::array a = new_floats({g.batch_size, g.num_query_heads, g.value_dim});
        return {a, static_cast<float*>(a.mutable_data())};
    }
    float* data = check_out(out, {g.batch_size, g.num_query_heads, g.value_dim});
    return {py::reinterpret_borrow<py::array>(out), data};
}

void unalias(FloatArray& x, const Output& o) {
    if (!overlaps(x, o.array)) return;
    FloatArray copy(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    std::copy(x.data(), x.data() + x.size(), copy.mutable_data());
    x = std::move(copy);
}

}  // namespace kvfold_py
