// The state format, version 4: a cache's configuration and state, little-endian throughout.
//
//   offset  size  field
//        0     8  magic "KVFOLD\r\n" (4b 56 46 4f 4c 44 0d 0a)
//        8     4  u32 format version (4 for a RoPE with frequencies, else 3; 1 and 2 are read too)
//       12     4  u32 flags (0; reserved)
//       16     8  u64 total size of the state in bytes, this header and the CRC included
//       24        config: i64 batch_size, num_heads, head_dim, value_dim, num_query_heads, window,
//                 sinks; f64 scale (0 = 1/sqrt(head_dim)); u8 dtype (0 float32, 1 float16,
//                 2 bfloat16, version 3: 3 int8); u8 check_finite (0 or 1)
//                 version 2: f64 rope theta (0: no RoPE), i64 rope dim (0: the whole head), u8 rope
//                 layout (0 half, 1 interleaved), u8 retain (0 fifo, 1 tova, 2 h2o), i64 recent (-1:
//                 the default)
//                 version 4: u32 rope frequency count (rope dim / 2), f64 frequencies[count]
//                 rule: str kind; u32 array count, then per array (by name): str name, u32 rank,
//                 i64 shape[rank], f64 values[prod(shape)]; u32 option count, then per option (by
//                 name): str name, str value
//                 i64 length[batch_size]: tokens seen per row
//                 version 2: i64 last position[batch_size]: each row's latest (0 before any token)
//                 u32 buffer count, then per buffer: u64 bytes per lane, then every lane's bytes,
//                 lane = row * num_heads + head (the cache's sinks k, v, window k, v and, for matrix
//                 rules with per-token gates, the window's gates; version 2: with a RoPE the window's
//                 positions, with tova or h2o the window's scores and order; then the rule's buffers,
//                 in the order they are registered)
//
// Version 3 adds the dtype int8 (rows in the q8_0 layout, kernels/q8.hpp) and nothing else.
// Version 4 adds a RoPE's own frequencies (a model's scaled RoPE); a state without them is written as
// version 3, so that the kvfold versions that read only 3 still read it.
// Version 1 has no RoPE, retention or positions: a cache read from it is fifo, without a RoPE, and
// each row's last position is its length minus one.
//   total-4        u32 CRC32 (zlib's) of every byte before it
//
// A str is a u32 byte count (at most 4096) and the bytes; names (kind, parameter and option names)
// are identifiers, option values printable ASCII. Readers check the header and the CRC
// first, then every count against the bytes that remain, before anything is allocated.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "attention.hpp"
#include "cache_impl.hpp"
#include "kernels/kernels.hpp"
#include "retention.hpp"

namespace kvfold {
namespace {

constexpr char kMagic[8] = {'K', 'V', 'F', 'O', 'L', 'D', '\r', '\n'};
constexpr uint32_t kFormatVersion = 4;  // the newest this kvfold reads
constexpr uint32_t kMaxName = 1 << 12;
constexpr size_t kHeader = MemoryCache::kStateHeader;  // magic, version, flags, total size

bool little_endian_host() {
    const uint16_t one = 1;
    uint8_t first;
    std::memcpy(&first, &one, 1);
    return first == 1;
}

uint32_t crc32(const uint8_t* p, size_t n) {
    static const auto table = [] {
        std::array<uint32_t, 256> t{};
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

class Writer {
   public:
    template <class T>
    void put(T x) {
        raw(&x, sizeof(T));
    }
    void str(const std::string& s) {
        put<uint32_t>(static_cast<uint32_t>(s.size()));
        raw(s.data(), s.size());
    }
    void raw(const void* p, size_t n) { out.append(static_cast<const char*>(p), n); }
    std::string out;
};

class Reader {
   public:
    Reader(const uint8_t* p, size_t n) : p_(p), n_(n) {}
    size_t left() const { return n_ - at_; }
    template <class T>
    T get(const char* what) {
        T x;
        std::memcpy(&x, take(sizeof(T), what), sizeof(T));
        return x;
    }
    // Names are identifiers ([A-Za-z_][A-Za-z0-9_]*); other strings are printable ASCII.
    std::string str(const char* what, bool identifier) {
        uint32_t n = get<uint32_t>(what);
        if (n > kMaxName)
            fail(std::string(what) + " is " + std::to_string(n) + " bytes long, at most " + std::to_string(kMaxName) +
                 " allowed");
        std::string s(reinterpret_cast<const char*>(take(n, what)), n);
        for (size_t i = 0; i < s.size(); ++i) {
            unsigned char c = static_cast<unsigned char>(s[i]);
            bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_', digit = c >= '0' && c <= '9';
            bool ok = identifier ? letter || (i > 0 && digit) : c >= 0x20 && c < 0x7f;
            if (!ok)
                fail(std::string(what) + " has byte " + std::to_string(c) + " at position " + std::to_string(i) +
                     (identifier ? ", expected an identifier" : ", expected printable ASCII"));
        }
        if (identifier && s.empty()) fail(std::string(what) + " is empty");
        return s;
    }
    const uint8_t* take(size_t n, const char* what) {
        if (n > left())
            fail("truncated: " + std::string(what) + " needs " + std::to_string(n) + " bytes at offset " +
                 std::to_string(at_) + ", only " + std::to_string(left()) + " remain");
        const uint8_t* p = p_ + at_;
        at_ += n;
        return p;
    }
    [[noreturn]] static void fail(const std::string& why) { throw ValueError("data: invalid kvfold state: " + why); }

   private:
    const uint8_t* p_;
    size_t n_, at_ = 0;
};

// The buffers the format holds: all but those the rule derives from the others (rebuilt after a load).
template <class Buffer>
std::vector<Buffer*> saved(std::vector<Buffer*> all, const Rule& rule) {
    all.erase(std::remove_if(all.begin(), all.end(), [&](const LaneBuffer* b) { return rule.derived(b); }), all.end());
    return all;
}

// Whether the values of a buffer that finite inputs keep finite (Holds) are all finite (a score may
// also be NaN: its pair was not scored yet).
bool holds_finite(const LaneBuffer& b) {
    Holds h = b.holds();
    if (h.kind == Holds::rows && h.dtype == DType::float32) h.kind = Holds::f32;  // no conversion needed
    const Kernels& K = kernels();
    std::vector<float> row(static_cast<size_t>(h.kind == Holds::rows ? h.d : 0));
    for (int64_t lane = 0; lane < b.lanes(); ++lane) {
        const uint8_t* p = b.lane(lane);
        const size_t n = b.lane_bytes();
        if (h.kind == Holds::f32 && !K.all_finite(reinterpret_cast<const float*>(p), n / sizeof(float))) return false;
        if (h.kind == Holds::scores)
            for (size_t i = 0; i < n; i += sizeof(float)) {
                float x;
                std::memcpy(&x, p + i, sizeof x);
                if (std::isinf(x)) return false;
            }
        if (h.kind == Holds::f64)
            for (size_t i = 0; i < n; i += sizeof(double)) {
                double x;
                std::memcpy(&x, p + i, sizeof x);
                if (!std::isfinite(x)) return false;
            }
        if (h.kind == Holds::rows)
            for (size_t at = 0, step = row_bytes(h.dtype, h.d); step && at + step <= n; at += step) {
                load_row(row.data(), p + at, h.d, h.dtype);
                if (!K.all_finite(row.data(), h.d)) return false;
            }
    }
    return true;
}

}  // namespace

std::string MemoryCache::to_bytes() const {
    SettledLock lock(impl());
    const Impl& c = impl();
    if (c.spec.kind == "custom")
        throw ValueError(
            "rule: Custom rules cannot be serialized (their function is Python code); "
            "use copy() or checkpoint() within a process");
    if (!little_endian_host()) throw ValueError("to_bytes: the state format needs a little-endian host");
    Writer w;
    w.out.reserve(kHeader + 4096 + c.planned_bytes());
    w.raw(kMagic, 8);
    const Config& g = c.cfg;
    const std::vector<double>& frequencies = g.rope.frequencies;
    w.put<uint32_t>(frequencies.empty() ? 3 : 4);
    w.put<uint32_t>(0);
    w.put<uint64_t>(0);  // total size, filled in below
    for (int64_t x : {g.batch_size, g.num_heads, g.head_dim, g.value_dim, g.num_query_heads, g.window, g.sinks})
        w.put<int64_t>(x);
    w.put<double>(g.scale);
    w.put<uint8_t>(static_cast<uint8_t>(g.dtype));
    w.put<uint8_t>(g.check_finite ? 1 : 0);
    w.put<double>(g.rope.theta);
    w.put<int64_t>(g.rope.dim);
    w.put<uint8_t>(g.rope.interleaved ? 1 : 0);
    w.put<uint8_t>(static_cast<uint8_t>(g.retain));
    w.put<int64_t>(g.recent);
    if (!frequencies.empty()) {
        w.put<uint32_t>(static_cast<uint32_t>(frequencies.size()));
        for (double f : frequencies) w.put<double>(f);
    }
    w.str(c.spec.kind);
    w.put<uint32_t>(static_cast<uint32_t>(c.spec.arrays.size()));
    for (const auto& [name, a] : c.spec.arrays) {
        w.str(name);
        w.put<uint32_t>(static_cast<uint32_t>(a.shape.size()));
        for (int64_t d : a.shape) w.put<int64_t>(d);
        w.raw(a.data.data(), sizeof(double) * a.data.size());
    }
    w.put<uint32_t>(static_cast<uint32_t>(c.spec.options.size()));
    for (const auto& [name, value] : c.spec.options) {
        w.str(name);
        w.str(value);
    }
    w.raw(c.length.data(), sizeof(int64_t) * c.length.size());
    w.raw(c.last_pos.data(), sizeof(int64_t) * c.last_pos.size());
    auto bufs = saved(c.buffers(), *c.rule);
    w.put<uint32_t>(static_cast<uint32_t>(bufs.size()));
    for (const LaneBuffer* b : bufs) {
        w.put<uint64_t>(b->lane_bytes());
        for (int64_t lane = 0; lane < b->lanes() && b->lane_bytes(); ++lane) w.raw(b->lane(lane), b->lane_bytes());
    }
    const uint64_t total = w.out.size() + 4;
    std::memcpy(&w.out[16], &total, 8);
    w.put<uint32_t>(crc32(reinterpret_cast<const uint8_t*>(w.out.data()), w.out.size()));
    return std::move(w.out);
}

size_t MemoryCache::state_size(const void* data, size_t size) {
    const auto* bytes = static_cast<const uint8_t*>(data);
    if (size == 0) Reader::fail("empty input (0 bytes)");
    if (std::memcmp(bytes, kMagic, std::min<size_t>(size, 8)) != 0)
        Reader::fail("wrong magic: expected the bytes \"KVFOLD\\r\\n\", this is not a kvfold state");
    if (size < kHeader)
        Reader::fail("truncated: " + std::to_string(size) + " bytes, shorter than the " + std::to_string(kHeader) +
                     "-byte header");
    uint32_t version;
    uint64_t total;
    std::memcpy(&version, bytes + 8, 4);
    std::memcpy(&total, bytes + 16, 8);
    if (version > kFormatVersion)
        Reader::fail("format version " + std::to_string(version) + " is newer than this kvfold reads (" +
                     std::to_string(kFormatVersion) + "); upgrade kvfold");
    if (version == 0) Reader::fail("format version 0 does not exist");
    if (total < kHeader + 4) Reader::fail("the header claims " + std::to_string(total) + " bytes, less than any state");
    if (total > SIZE_MAX) Reader::fail("the header claims " + std::to_string(total) + " bytes, more than memory holds");
    return static_cast<size_t>(total);
}

std::unique_ptr<MemoryCache> MemoryCache::from_bytes(const void* data, size_t size) {
    if (!little_endian_host()) throw ValueError("from_bytes: the state format needs a little-endian host");
    const auto* bytes = static_cast<const uint8_t*>(data);
    const size_t total = state_size(data, size);
    uint32_t flags, version;
    std::memcpy(&version, bytes + 8, 4);
    std::memcpy(&flags, bytes + 12, 4);
    if (size < total)
        Reader::fail("truncated: the state is " + std::to_string(total) + " bytes, got " + std::to_string(size));
    if (size > total)
        Reader::fail(std::to_string(size - total) + " unexpected bytes after the end of the " + std::to_string(total) +
                     "-byte state");
    uint32_t stored_crc;
    std::memcpy(&stored_crc, bytes + size - 4, 4);
    if (crc32(bytes, size - 4) != stored_crc) Reader::fail("CRC32 mismatch (the data is corrupted)");
    if (flags != 0)
        Reader::fail("flags are " + std::to_string(flags) + ", expected 0 in format version " +
                     std::to_string(version));

    Reader r(bytes + kHeader, size - kHeader - 4);
    Config g;
    g.batch_size = r.get<int64_t>("batch_size");
    g.num_heads = r.get<int64_t>("num_heads");
    g.head_dim = r.get<int64_t>("head_dim");
    g.value_dim = r.get<int64_t>("value_dim");
    g.num_query_heads = r.get<int64_t>("num_query_heads");
    g.window = r.get<int64_t>("window");
    g.sinks = r.get<int64_t>("sinks");
    g.scale = r.get<double>("scale");
    uint8_t dtype = r.get<uint8_t>("dtype");
    if (dtype > (version >= 3 ? 3 : 2))
        Reader::fail("dtype code " + std::to_string(dtype) + " is not 0, 1, 2" +
                     (version >= 3 ? " or 3" : " (3, int8, from format version 3 on)"));
    g.dtype = static_cast<DType>(dtype);
    uint8_t check_finite = r.get<uint8_t>("check_finite");
    if (check_finite > 1) Reader::fail("check_finite is " + std::to_string(check_finite) + ", expected 0 or 1");
    g.check_finite = check_finite == 1;
    if (version >= 2) {
        g.rope.theta = r.get<double>("rope theta");
        g.rope.dim = r.get<int64_t>("rope dim");
        uint8_t layout = r.get<uint8_t>("rope layout");
        if (layout > 1) Reader::fail("rope layout code " + std::to_string(layout) + " is not 0 or 1");
        g.rope.interleaved = layout == 1;
        uint8_t retain = r.get<uint8_t>("retain");
        if (retain > 2) Reader::fail("retain code " + std::to_string(retain) + " is not 0, 1 or 2");
        g.retain = static_cast<Retain>(retain);
        g.recent = r.get<int64_t>("recent");
    }
    if (version >= 4) {
        const uint32_t count = r.get<uint32_t>("rope frequency count");
        if (count > r.left() / sizeof(double))
            Reader::fail("the rope frequencies claim more values than the data holds");
        g.rope.frequencies.resize(count);
        const uint8_t* values = r.take(sizeof(double) * count, "rope frequencies");
        if (count) std::memcpy(g.rope.frequencies.data(), values, sizeof(double) * count);
    }

    RuleSpec spec;
    spec.kind = r.str("rule kind", true);
    uint32_t arrays = r.get<uint32_t>("rule array count");
    for (uint32_t i = 0; i < arrays; ++i) {
        std::string name = r.str("rule array name", true);
        if (spec.arrays.count(name)) Reader::fail("rule array '" + name + "' appears twice");
        uint32_t ndim = r.get<uint32_t>("rule array rank");
        if (ndim > 8) Reader::fail("rule array '" + name + "' has rank " + std::to_string(ndim) + ", at most 8");
        Array a;
        size_t count = 1;
        for (uint32_t d = 0; d < ndim; ++d) {
            int64_t n = r.get<int64_t>("rule array shape");
            if (n < 0 || static_cast<uint64_t>(n) > r.left() / sizeof(double) ||
                (count && static_cast<size_t>(n) > r.left() / sizeof(double) / count))
                Reader::fail("rule array '" + name + "' claims more values than the data holds");
            a.shape.push_back(n);
            count *= static_cast<size_t>(n);
        }
        a.data.resize(count);
        const uint8_t* values = r.take(sizeof(double) * count, "rule array values");
        if (count) std::memcpy(a.data.data(), values, sizeof(double) * count);  // an empty vector's data may be null
        spec.arrays[name] = std::move(a);
    }
    uint32_t options = r.get<uint32_t>("rule option count");
    for (uint32_t i = 0; i < options; ++i) {
        std::string name = r.str("rule option name", true);
        if (spec.options.count(name)) Reader::fail("rule option '" + name + "' appears twice");
        spec.options[name] = r.str("rule option value", false);
    }
    if (spec.kind == "custom") Reader::fail("the rule is Custom, and Custom rules cannot be serialized");

    if (g.batch_size < 1 || static_cast<uint64_t>(g.batch_size) > r.left() / sizeof(int64_t))
        Reader::fail("batch_size " + std::to_string(g.batch_size) + " does not fit the data");
    std::vector<int64_t> length(static_cast<size_t>(g.batch_size));
    std::memcpy(length.data(), r.take(sizeof(int64_t) * length.size(), "lengths"), sizeof(int64_t) * length.size());
    for (size_t b = 0; b < length.size(); ++b)
        if (length[b] < 0 || length[b] > Impl::kMaxLength)
            Reader::fail("length of row " + std::to_string(b) + " is " + std::to_string(length[b]) +
                         ", expected 0 to 2^62");

    std::vector<int64_t> last(length.size());
    if (version >= 2) {
        if (static_cast<uint64_t>(g.batch_size) > r.left() / sizeof(int64_t))
            Reader::fail("batch_size " + std::to_string(g.batch_size) + " does not fit the data");
        std::memcpy(last.data(), r.take(sizeof(int64_t) * last.size(), "last positions"),
                    sizeof(int64_t) * last.size());
        for (size_t b = 0; b < last.size(); ++b)
            if (last[b] < 0) Reader::fail("last position of row " + std::to_string(b) + " is negative");
    } else {  // no positions stored: the tokens the row has seen, minus one
        for (size_t b = 0; b < last.size(); ++b) last[b] = std::max<int64_t>(0, length[b] - 1);
    }

    std::unique_ptr<Impl> impl;
    try {
        impl = std::make_unique<Impl>(g, spec);  // validates configuration and rule; plans buffers
    } catch (const ValueError& e) {
        Reader::fail(std::string("the stored configuration is invalid: ") + e.what());
    }
    // Every state byte is in the data, so the state allocated is bounded by the input size (what a rule
    // derives from it, such as Merge's slots x slots cosines, only by the memory limit, as for any cache).
    size_t state = 0;
    for (const LaneBuffer* b : saved(impl->buffers(), *impl->rule)) {
        size_t n;
        if (mul_overflow(b->lane_bytes(), static_cast<size_t>(b->lanes()), &n) || add_overflow(state, n, &state))
            state = SIZE_MAX;
    }
    if (state > r.left())
        Reader::fail("the configuration needs " + (state == SIZE_MAX ? std::string("more") : std::to_string(state)) +
                     " bytes of state, the data holds " + std::to_string(r.left()));
    impl->allocate();
    impl->length = std::move(length);
    impl->last_pos = std::move(last);
    uint32_t nbuf = r.get<uint32_t>("buffer count");
    auto bufs = saved(impl->buffers(), *impl->rule);

    if (nbuf != bufs.size())
        Reader::fail("expected " + std::to_string(bufs.size()) + " buffers for this rule, got " + std::to_string(nbuf));
    for (LaneBuffer* b : bufs) {
        uint64_t lane_bytes = r.get<uint64_t>("buffer size");
        if (lane_bytes != b->lane_bytes())
            Reader::fail("a buffer holds " + std::to_string(lane_bytes) + " bytes per lane, the configuration needs " +
                         std::to_string(b->lane_bytes()));
        for (int64_t lane = 0; lane < b->lanes() && lane_bytes; ++lane)
            std::memcpy(b->lane(lane), r.take(lane_bytes, "buffer"), lane_bytes);
    }
    if (r.left()) Reader::fail(std::to_string(r.left()) + " unexpected bytes after the last buffer");
    for (size_t i = 0; g.check_finite && i < bufs.size(); ++i)
        if (!holds_finite(*bufs[i]))
            Reader::fail("buffer " + std::to_string(i) +
                         " holds a NaN or an Inf, which a cache with check_finite=True never stores");
    for (int64_t lane = 0; lane < impl->lanes; ++lane) {
        const std::string wrong = impl->rule->check_loaded(lane, impl->folded(impl->length[lane / g.num_heads]));
        if (!wrong.empty()) Reader::fail(wrong);
    }
    for (int64_t lane = 0; lane < impl->lanes; ++lane) impl->rule->rebuild(lane);
    try {
        check_window_order(*impl);
    } catch (const ValueError& e) {
        Reader::fail(e.what());
    }
    return std::unique_ptr<MemoryCache>(new MemoryCache(std::move(impl)));
}

}  // namespace kvfold
