// kvfold: a fixed-size attention memory with a recurrent update, Mem = Update(S_kv, Mem_pre).
//
// Public C++ API. Plain pointers and sizes, no Python types. Every array is float32, C order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvfold.h"  // KVFOLD_API: what the shared library exports

namespace kvfold {

// Bad input: the message names the argument, what was expected and what was received.
struct KVFOLD_API ValueError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};
struct KVFOLD_API TypeError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// A call the cache cannot take now: a Custom rule's fn calling back into the cache it folds for,
// or a wait between caches that would never end.
struct KVFOLD_API RuntimeError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Storage type of the pairs a cache keeps (sinks, window, memory slots). Compute is float32, but for
// int8 (q8_0: blocks of 32 values with a float32 scale each), whose scores multiply int8 by int8.
enum class DType : uint8_t { float32 = 0, float16 = 1, bfloat16 = 2, int8 = 3 };
KVFOLD_API DType parse_dtype(const std::string& name);
KVFOLD_API const char* dtype_name(DType dtype);
KVFOLD_API size_t dtype_size(DType dtype);

// A shape as Python writes the tuple, "(3,)" or "(2, 4)": how error messages name shapes.
KVFOLD_API std::string shape_str(const std::vector<int64_t>& shape);

// A rule parameter: float64 values with a shape ({} for a scalar).
struct Array {
    std::vector<int64_t> shape;
    std::vector<double> data;
};

// A user-supplied fold (rules.Custom), called for one batch row with all KV heads: mem_k
// (heads, slots, d_k) and mem_v (heads, slots, d_v) are updated in place from k (heads, d_k) and
// v (heads, d_v); count is the number of pairs folded before this one. It may throw; the cache is
// then restored.
struct CustomCall {
    float* mem_k;
    float* mem_v;
    const float* k;
    const float* v;
    int64_t heads, slots, dk, dv, count;
};
using CustomFold = std::function<void(const CustomCall& call)>;

// What a rule is: its kind ("cumulative", "ema", ...) and its parameters. This is what Python
// passes in and what the state format stores.
struct RuleSpec {
    std::string kind;
    std::map<std::string, Array> arrays;
    std::map<std::string, std::string> options;
    CustomFold custom;  // kind == "custom" only
};

// Checks a rule's parameters without building a cache; throws ValueError naming the parameter.
KVFOLD_API void check_rule(const RuleSpec& spec);

// Rotary position embedding of keys (a model's RoPE): pair i of the first `dim` dimensions turns by
// p * f_i at position p, f_i = theta^(-2i / dim) or, when given, frequencies[i] (a model's scaled RoPE:
// linear, llama3, yarn); pair i is (i, i + dim/2) (half layout, Hugging Face Llama's rotate_half) or
// (2i, 2i + 1) (interleaved). theta == 0: the cache has no RoPE. dim == 0: the whole head.
// A cache with a RoPE folds each pair un-rotated (at minus its position) and reads a memory slot's key
// rotated at the slot's position, the same average of the folded positions as its key is of the keys.
struct RoPE {
    double theta = 0;
    int64_t dim = 0;
    bool interleaved = false;
    std::vector<double> frequencies = {};  // dim / 2 finite values, or empty: theta's
};

// Which pair of the window and the new one is folded when the window is full: the oldest (fifo), the
// one the latest queries weighed least (tova: the weight of the latest attend; h2o: the sum of the
// weights of every attend, the `recent` newest never folded). Unscored pairs (not yet attended) are
// kept before any scored one; among equals the oldest is folded.
enum class Retain : uint8_t { fifo = 0, tova = 1, h2o = 2 };
KVFOLD_API Retain parse_retain(const std::string& name);
KVFOLD_API const char* retain_name(Retain retain);

// The longest window, and the most sinks, a cache keeps.
constexpr int64_t kMaxWindow = int64_t(1) << 32;

struct Config {
    int64_t batch_size = 1;
    int64_t num_heads = 1;        // KV heads
    int64_t head_dim = 1;         // d_k
    int64_t value_dim = 1;        // d_v
    int64_t num_query_heads = 1;  // a multiple of num_heads (grouped-query attention)
    int64_t window = 0;           // pairs kept exactly, FIFO
    int64_t sinks = 0;            // first pairs kept exactly forever
    double scale = 0;             // score scale; 0 means 1 / sqrt(head_dim)
    DType dtype = DType::float32;
    bool check_finite = true;  // reject NaN / Inf in inputs
    RoPE rope;                 // none by default
    Retain retain = Retain::fifo;
    int64_t recent = -1;  // h2o only: the newest pairs never folded, in [0, window]; -1: window / 2
};

// Per-token values of the gated / delta matrix rules (null when not given).
// decay: log-space gate, (B, H, T) or (B, H, T, d_k) per decay_per_key; beta: (B, H, T).
struct TokenGates {
    const float* decay = nullptr;
    bool decay_per_key = false;
    const float* beta = nullptr;
};

class MemoryCache;

// An immutable snapshot of a cache: configuration, rule, per-row lengths and every buffer.
// MemoryCache::checkpoint() makes one; rollback() restores it. Each costs one copy of the state.
class KVFOLD_API Checkpoint {
   public:
    const Config& config() const;
    const RuleSpec& rule() const;
    std::vector<int64_t> lengths() const;
    // Each row's latest position (0 before its first token): the next may not be lower.
    std::vector<int64_t> last_positions() const;
    size_t nbytes() const;

    // Zero-filled storage, as for MemoryCache.
    static void* operator new(size_t size);
    static void operator delete(void* p);

   private:
    friend class MemoryCache;
    const MemoryCache& state() const;  // throws TypeError for a checkpoint that holds nothing
    std::shared_ptr<const MemoryCache> state_;
};

class KVFOLD_API MemoryCache {
   public:
    MemoryCache(const Config& config, const RuleSpec& rule);
    MemoryCache(const MemoryCache& other);  // deep copy
    MemoryCache& operator=(const MemoryCache&) = delete;
    ~MemoryCache();

    const Config& config() const;
    const RuleSpec& rule() const;
    float scale() const;
    int64_t memory_slots() const;    // summary slots a row can show (0 for Drop and matrix rules)
    bool matrix_memory() const;      // true for the linear-attention family (S is d_k x d_v)
    bool matrix_normalized() const;  // a matrix rule that also keeps z (d_k), normalize=True

    // k (B, H, T, d_k), v (B, H, T, d_v): T tokens per row, in order. positions (B, T), or null for
    // the tokens each row has seen: integers >= 0 that never decrease within a row.
    void update(const float* k, const float* v, int64_t T, const TokenGates& gates = {},
                const int64_t* positions = nullptr);
    // q (B, Hq, d_k) -> out (B, Hq, d_v). With retain tova or h2o, records the window's weights.
    void attend(const float* q, float* out);
    // update with one token (positions (B,) or null), then attend (the token sees itself).
    void step(const float* q, const float* k, const float* v, float* out, const TokenGates& gates = {},
              const int64_t* positions = nullptr);
    // q (B, Hq, T, d_k), k (B, H, T, d_k), v (B, H, T, d_v) -> out (B, Hq, T, d_v); a loop of step.
    void forward(const float* q, const float* k, const float* v, int64_t T, float* out, const TokenGates& gates = {},
                 const int64_t* positions = nullptr);

    // Summary slots, oldest first, zero where not yet filled: keys (B, H, slots, d_k, un-rotated
    // with a RoPE), values (B, H, slots, d_v). Matrix rules: S (B, H, d_k, d_v) in keys, z (B, H, d_k) in values
    // (when normalized; values may be null otherwise).
    void memory(float* keys, float* values) const;
    // Matrix rules only: sets S (B, H, d_k, d_v) and, when normalized, z (B, H, d_k; else null),
    // e.g. the state of ONNX LinearAttention, to continue from it.
    void load_memory(const float* keys, const float* values);

    // The visible set per row [sinks | slots | window], oldest first, as attention reads it (slot keys
    // rotated at their positions with a RoPE): n = visible_size() pairs in
    // the largest row. visible() writes it padded with zeros to `rows` >= n rows per head: keys
    // (B, H, rows, d_k), values (B, H, rows, d_v), mask (B, rows). It returns n; when n > rows
    // (tokens arrived since the caller sized its arrays) it writes nothing.
    int64_t visible_size() const;
    int64_t visible(float* keys, float* values, uint8_t* mask, int64_t rows) const;

    void reset();
    void reset_rows(const int64_t* rows, int64_t count);
    std::vector<int64_t> lengths() const;
    // Each row's latest position (0 before its first token): the next may not be lower.
    std::vector<int64_t> last_positions() const;
    size_t nbytes() const;

    // Versioned little-endian binary state with CRC32; see README "Persistence and rollback".
    std::string to_bytes() const;
    static std::unique_ptr<MemoryCache> from_bytes(const void* data, size_t size);
    // The whole size a state declares in its header (its first kStateHeader bytes), so a reader can
    // check a file's length before reading it; throws ValueError when the bytes are not a kvfold
    // state header.
    static constexpr size_t kStateHeader = 24;
    static size_t state_size(const void* header, size_t size);

    // Checkpoints (batch_ops.cpp). rollback restores a checkpoint bit-exactly, for every row or for
    // `count` rows; it accepts a checkpoint of any cache with the same configuration (rule and every
    // constructor argument, batch size included) and throws ValueError for any other.
    Checkpoint checkpoint() const;
    void rollback(const Checkpoint& checkpoint);
    void rollback_rows(const Checkpoint& checkpoint, const int64_t* rows, int64_t count);

    // Batch operations: new row r is old row indices[r]; indices may repeat. reorder works in place
    // and makes the batch size `count` (callers that size arrays from config() must not race with a
    // reorder that changes it); select returns a new cache.
    void reorder(const int64_t* indices, int64_t count);
    std::unique_ptr<MemoryCache> select(const int64_t* rows, int64_t count) const;
    // The rows of every cache, in order. Configurations must match except for the batch size.
    static std::unique_ptr<MemoryCache> concat(const std::vector<const MemoryCache*>& caches);

    // Zero-filled storage: an object whose constructor never ran (Python's __new__ alone can make
    // one) holds no state, and every call on it throws TypeError instead of reading garbage.
    static void* operator new(size_t size);
    static void operator delete(void* p);

    struct Impl;

   private:
    explicit MemoryCache(std::unique_ptr<Impl> impl);
    Impl& impl() const;  // throws TypeError when the constructor never ran
    std::unique_ptr<Impl> impl_;
};

// The kernels chosen at load time: "scalar", "avx2", "avx512", "avx512bf16" or "neon".
KVFOLD_API const char* simd_backend();
// Backends this machine can run, least capable first. "avx512bf16" (bfloat16 keys scored by
// vdpbf16ps, the query rounded to bfloat16) runs only when named, never by default.
KVFOLD_API std::vector<std::string> available_backends();
// Every backend name kvfold knows: scalar, avx2, avx512, avx512bf16, neon.
KVFOLD_API std::vector<std::string> known_backends();
// Caps the backend, as the environment variable KVFOLD_SIMD does at load time: the best kernels at
// or below the cap run (a cap above what the machine runs means the best it runs; a name of another
// architecture caps nothing, and leaves the default). Throws ValueError for a name kvfold does not know.
KVFOLD_API void set_simd_backend(const std::string& name);

// Threads a call may use, the calling thread included (work splits over batch rows x KV heads
// when there is enough of it). Default: the cores this process may run on. Results do not depend
// on it. set_num_threads throws ValueError outside [1, kMaxThreads].
constexpr int64_t kMaxThreads = 1024;
KVFOLD_API void set_num_threads(int64_t n);
KVFOLD_API int get_num_threads();
// Tokens per chunk when a matrix rule (the linear-attention family) takes a block: forward and
// block updates run chunk by chunk as small matrix products. A knob for speed only: results change
// by float rounding at most. set_chunk_size throws ValueError outside [1, kMaxChunk].
constexpr int64_t kMaxChunk = 256;
KVFOLD_API void set_chunk_size(int64_t n);
KVFOLD_API int64_t get_chunk_size();
// The least work (estimated flops) a call needs before it is shared out; returns the previous
// value. Tests lower it to reach the pool with small shapes.
KVFOLD_API double set_min_shared_flops(double flops);

KVFOLD_API const char* version();

}  // namespace kvfold
