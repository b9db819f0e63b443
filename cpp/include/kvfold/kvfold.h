/*
 * kvfold C API: a fixed-size attention memory (sinks + a FIFO window kept exactly, evicted pairs folded
 * into a small memory by an update rule), usable from C89, C99 and C++ through an opaque handle.
 *
 * Arrays are float32 in C order; shapes use B = batch_size, H = num_heads (KV heads),
 * Hq = num_query_heads, T = tokens per call, d_k = head_dim, d_v = value_dim.
 *
 * Errors: every function that can fail returns a kvfold_status. KVFOLD_OK is 0; on any other code
 * the call changed nothing (the cache is exactly as before) and kvfold_last_error() says why, naming
 * the argument, what was expected and what was received. No C++ exception ever crosses this API, and
 * a null handle or a null pointer where an array is required is an error, not a crash.
 *
 * Threads: a handle may be used from several threads; the library serializes the calls on one
 * handle. Different handles are independent.
 *
 * Ownership: the caller owns every array it passes in and out. Handles (kvfold_cache,
 * kvfold_checkpoint) are released with kvfold_free / kvfold_checkpoint_free; a state buffer that
 * the library allocated (kvfold_to_bytes_alloc) is released with kvfold_free_bytes, never with the
 * caller's free() (the library and the program may use different C runtimes).
 */
#ifndef KVFOLD_H
#define KVFOLD_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) || defined(__CYGWIN__)
#if defined(KVFOLD_BUILDING_SHARED)
#define KVFOLD_API __declspec(dllexport)
#elif defined(KVFOLD_SHARED)
#define KVFOLD_API __declspec(dllimport)
#else
#define KVFOLD_API
#endif
#elif defined(__GNUC__) || defined(__clang__)
#define KVFOLD_API __attribute__((visibility("default")))
#else
#define KVFOLD_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. */
typedef enum kvfold_status {
    KVFOLD_OK = 0,
    KVFOLD_VALUE_ERROR = 1,   /* bad argument value or shape, a null pointer, corrupt state data */
    KVFOLD_TYPE_ERROR = 2,    /* an argument of the wrong kind (e.g. a rule only Python can build) */
    KVFOLD_OUT_OF_MEMORY = 3, /* an allocation failed, or the cache would not fit in memory */
    KVFOLD_INTERNAL_ERROR = 4 /* anything else: a bug, please report it with the message */
} kvfold_status;

/* Storage type of the pairs a cache keeps; compute is float32. */
typedef enum kvfold_dtype { KVFOLD_FLOAT32 = 0, KVFOLD_FLOAT16 = 1, KVFOLD_BFLOAT16 = 2, KVFOLD_INT8 = 3 } kvfold_dtype;

typedef struct kvfold_cache kvfold_cache;           /* a cache (opaque) */
typedef struct kvfold_checkpoint kvfold_checkpoint; /* an immutable snapshot of a cache (opaque) */

/* The shape of a cache. Fill it with kvfold_config_init, then set what differs. */
typedef struct kvfold_config {
    int64_t batch_size;      /* B, default 1 */
    int64_t num_heads;       /* H, KV heads, default 1 */
    int64_t head_dim;        /* d_k, default 1 */
    int64_t value_dim;       /* d_v, default 1 */
    int64_t num_query_heads; /* Hq, a multiple of H (grouped-query attention), default 1 */
    int64_t window;          /* pairs kept exactly, FIFO, default 0 */
    int64_t sinks;           /* first pairs kept exactly forever, default 0 */
    double scale;            /* score scale; 0 (default) means 1 / sqrt(d_k) */
    int dtype;               /* a kvfold_dtype, default KVFOLD_FLOAT32 */
    int check_finite;        /* nonzero (default): reject NaN and Inf in inputs */
} kvfold_config;

/* A rule parameter: float64 values, C order, of shape shape[0..ndim) (ndim 0: a scalar, one value). */
typedef struct kvfold_param {
    const char* name;
    const double* data;
    const int64_t* shape; /* may be null when ndim is 0 */
    int ndim;
} kvfold_param;

/* A rule option, e.g. {"feature_map", "elu1"} or {"normalize", "true"} for the linear rule. */
typedef struct kvfold_option {
    const char* name;
    const char* value;
} kvfold_option;

/* What folds evicted pairs into the memory: kind is one of "drop", "cumulative", "moving",
 * "weighted", "ema", "compressive", "merge", "gru", "linear", "gated", "delta", "gated_delta" (the
 * parameters of each are listed in docs/c-api.md). Custom rules take a Python function and are
 * not available here. */
typedef struct kvfold_rule {
    const char* kind;
    const kvfold_param* params; /* may be null when num_params is 0 */
    size_t num_params;
    const kvfold_option* options; /* may be null when num_options is 0 */
    size_t num_options;
} kvfold_rule;

/* Per-token gates of the gated and delta matrix rules; pass null (or null members) when not used.
 * decay: log-space decay, (B, H, T), or (B, H, T, d_k) when decay_per_key is nonzero.
 * beta: (B, H, T). */
typedef struct kvfold_gates {
    const float* decay;
    int decay_per_key;
    const float* beta;
} kvfold_gates;

/* How a RoPE pairs a head's dimensions: dimension i with i + dim / 2 (HF Llama's rotate_half), or
 * 2i with 2i + 1. */
typedef enum kvfold_rope_layout { KVFOLD_ROPE_HALF = 0, KVFOLD_ROPE_INTERLEAVED = 1 } kvfold_rope_layout;

/* Which pair is folded when the window is full: the oldest (FIFO), the one the latest attend weighed
 * least (TOVA), or the one with the least weight summed over every attend, the `recent` newest never
 * folded (H2O). */
typedef enum kvfold_retain { KVFOLD_RETAIN_FIFO = 0, KVFOLD_RETAIN_TOVA = 1, KVFOLD_RETAIN_H2O = 2 } kvfold_retain;

/* What a cache takes beyond kvfold_config: RoPE-aware folding and the retention. Fill it with
 * kvfold_options_init(&options, sizeof options), then set what differs. `size` is the struct's size as
 * the program was compiled; later versions add members at the end and read only those that fit. */
typedef struct kvfold_options {
    size_t size;       /* set by kvfold_options_init */
    double rope_theta; /* keys come rotated by a RoPE of this base (e.g. 10000): pairs are folded
                          un-rotated, and memory slots read rotated at their (mean) positions;
                          0 (default): no RoPE */
    int64_t rope_dim;  /* dimensions rotated (even, at most d_k); 0 (default): all of them */
    int rope_layout;   /* a kvfold_rope_layout, default KVFOLD_ROPE_HALF */
    int retain;        /* a kvfold_retain, default KVFOLD_RETAIN_FIFO */
    int64_t recent;    /* H2O: the newest window pairs never folded, in [0, window]; -1 (default):
                          window / 2 (other retentions: -1) */
    /* Added after `recent` (a size that ends at `recent` is still taken, with these at their defaults):
       with rope_theta, the angle per position of each rotated pair, rope_frequency_count (rope dim / 2)
       finite values in place of theta^(-2i / dim), for a model's scaled RoPE (linear, llama3, yarn).
       Null and 0 (default): theta's. The cache copies them; kvfold_get_options points into the cache
       (valid while it lives). */
    const double* rope_frequencies;
    int64_t rope_frequency_count;
} kvfold_options;

/* ---- errors, library ---- */

/* The message of the last failing call on `cache`, or, with a null cache, the last failing call on
 * this thread (any call: use it for kvfold_create and kvfold_from_bytes, which have no handle yet,
 * and when several threads share a handle). "" when there was none. Valid until the next failing call
 * on the same handle (or thread); never null. */
KVFOLD_API const char* kvfold_last_error(const kvfold_cache* cache);
/* "ok", "value error", "type error", "out of memory", "internal error" or "unknown status". */
KVFOLD_API const char* kvfold_status_name(int status);
/* The library version, e.g. "0.1.0". */
KVFOLD_API const char* kvfold_version(void);
/* The kernels in use: "scalar", "avx2", "avx512", "avx512bf16" or "neon". */
KVFOLD_API const char* kvfold_simd_backend(void);
/* Caps the kernels at one of those names (as the environment variable KVFOLD_SIMD does at load
   time); "" restores the choice made without a cap. */
KVFOLD_API kvfold_status kvfold_set_simd_backend(const char* name);
/* Threads a call may use, the caller included: n in [1, 1024]. Results do not depend on it. */
KVFOLD_API kvfold_status kvfold_set_num_threads(int64_t n);
KVFOLD_API int kvfold_get_num_threads(void);

/* ---- a cache ---- */

/* Defaults: batch 1, one head of dimension 1, no window, no sinks, float32, finite checks on. */
KVFOLD_API void kvfold_config_init(kvfold_config* config);
/* A new, empty cache in *out (set to null on failure). Release it with kvfold_free. */
KVFOLD_API kvfold_status kvfold_create(const kvfold_config* config, const kvfold_rule* rule, kvfold_cache** out);
/* Defaults (no RoPE, FIFO) into *options, which is `size` bytes: pass sizeof(kvfold_options).
 * A size this library does not know is a KVFOLD_VALUE_ERROR (options untouched). */
KVFOLD_API kvfold_status kvfold_options_init(kvfold_options* options, size_t size);
/* kvfold_create with options (null: the defaults). */
KVFOLD_API kvfold_status kvfold_create_with_options(const kvfold_config* config, const kvfold_options* options,
                                                    const kvfold_rule* rule, kvfold_cache** out);
/* Releases a cache; null is ignored. */
KVFOLD_API void kvfold_free(kvfold_cache* cache);
/* Its configuration (as created, or as stored in the bytes it was read from). */
KVFOLD_API kvfold_status kvfold_get_config(const kvfold_cache* cache, kvfold_config* out);

/* Its options; out->size says how much of *out to fill (set it with kvfold_options_init). */
KVFOLD_API kvfold_status kvfold_get_options(const kvfold_cache* cache, kvfold_options* out);

/* Appends T tokens to every row: k (B, H, T, d_k), v (B, H, T, d_v); gates may be null. */
KVFOLD_API kvfold_status kvfold_update(kvfold_cache* cache, const float* k, const float* v, int64_t T,
                                       const kvfold_gates* gates);
/* Attention over what each row holds: q (B, Hq, d_k) -> out (B, Hq, d_v). */
KVFOLD_API kvfold_status kvfold_attend(kvfold_cache* cache, const float* q, float* out);
/* One token: update with k (B, H, d_k), v (B, H, d_v), then attend with q (B, Hq, d_k) -> out
 * (B, Hq, d_v); the token sees itself. gates may be null. */
KVFOLD_API kvfold_status kvfold_step(kvfold_cache* cache, const float* q, const float* k, const float* v, float* out,
                                     const kvfold_gates* gates);
/* T tokens, each attending causally (a loop of step, computed faster): q (B, Hq, T, d_k),
 * k (B, H, T, d_k), v (B, H, T, d_v) -> out (B, Hq, T, d_v). gates may be null. */
KVFOLD_API kvfold_status kvfold_forward(kvfold_cache* cache, const float* q, const float* k, const float* v, int64_t T,
                                        float* out, const kvfold_gates* gates);

/* The same at given positions: the tokens' positions in their sequences, integers >= 0 that never
 * decrease within a row (a RoPE rotated each key at its position). positions is (B, T) for update and
 * forward, (B,) for step; null means the tokens each row has seen (the calls above). */
KVFOLD_API kvfold_status kvfold_update_at(kvfold_cache* cache, const float* k, const float* v, int64_t T,
                                          const kvfold_gates* gates, const int64_t* positions);
KVFOLD_API kvfold_status kvfold_step_at(kvfold_cache* cache, const float* q, const float* k, const float* v, float* out,
                                        const kvfold_gates* gates, const int64_t* positions);
KVFOLD_API kvfold_status kvfold_forward_at(kvfold_cache* cache, const float* q, const float* k, const float* v,
                                           int64_t T, float* out, const kvfold_gates* gates, const int64_t* positions);
/* Each row's latest position (0 before its first token; the next may not be lower): B values into
 * out[0..capacity). */
KVFOLD_API kvfold_status kvfold_last_positions(const kvfold_cache* cache, int64_t* out, int64_t capacity);

/* Empties every row, or the `count` rows listed (each in [0, B)). */
KVFOLD_API kvfold_status kvfold_reset(kvfold_cache* cache);
KVFOLD_API kvfold_status kvfold_reset_rows(kvfold_cache* cache, const int64_t* rows, int64_t count);

/* Tokens each row has seen: B values into out[0..capacity). */
KVFOLD_API kvfold_status kvfold_lengths(const kvfold_cache* cache, int64_t* out, int64_t capacity);
/* Bytes the cache holds (fixed at creation: it never grows with tokens). */
KVFOLD_API kvfold_status kvfold_nbytes(const kvfold_cache* cache, size_t* out);

/* The rule's memory. Summary rules: slots per row and head, keys (B, H, slots, d_k) and values
 * (B, H, slots, d_v), oldest first, zero where not yet filled. Matrix rules (linear, gated, delta,
 * gated_delta): S (B, H, d_k, d_v) in keys and, when the linear rule normalizes, z (B, H, d_k) in
 * values. kvfold_memory_size gives the float counts (0 for a rule that keeps nothing); kvfold_memory
 * fails unless each capacity (in floats) is at least that. */
KVFOLD_API kvfold_status kvfold_memory_size(const kvfold_cache* cache, size_t* key_floats, size_t* value_floats);
KVFOLD_API kvfold_status kvfold_memory(const kvfold_cache* cache, float* keys, size_t key_capacity, float* values,
                                       size_t value_capacity);

/* ---- state ---- */

/* The state as bytes (versioned, little-endian, checksummed). *size is set to the bytes needed;
 * they are written when buffer is not null and capacity >= *size, and a smaller capacity is a
 * KVFOLD_VALUE_ERROR (buffer untouched). Pass buffer = null to ask for the size. */
KVFOLD_API kvfold_status kvfold_to_bytes(const kvfold_cache* cache, void* buffer, size_t capacity, size_t* size);
/* The same into a buffer the library allocates (*data, *size); release it with kvfold_free_bytes. */
KVFOLD_API kvfold_status kvfold_to_bytes_alloc(const kvfold_cache* cache, void** data, size_t* size);
KVFOLD_API void kvfold_free_bytes(void* data);
/* A new cache from bytes of kvfold_to_bytes (or Python's to_bytes); every size is checked first. */
KVFOLD_API kvfold_status kvfold_from_bytes(const void* data, size_t size, kvfold_cache** out);

/* A snapshot in *out (kvfold_checkpoint_new); rollback restores it bit-exactly, for every row or for `count` rows, into
 * any cache of the same configuration. Release it with kvfold_checkpoint_free (null is ignored);
 * it stays valid after its cache is freed. */
KVFOLD_API kvfold_status kvfold_checkpoint_new(const kvfold_cache* cache, kvfold_checkpoint** out);
KVFOLD_API kvfold_status kvfold_rollback(kvfold_cache* cache, const kvfold_checkpoint* checkpoint);
KVFOLD_API kvfold_status kvfold_rollback_rows(kvfold_cache* cache, const kvfold_checkpoint* checkpoint,
                                              const int64_t* rows, int64_t count);
KVFOLD_API void kvfold_checkpoint_free(kvfold_checkpoint* checkpoint);

#ifdef __cplusplus
}
#endif

#endif /* KVFOLD_H */
