// int8 (q8_0) rows, written once as plain loops that each kernel file's target vectorizes; a file
// with faster code for a piece passes it to the skeletons below or sets the entry again. The
// layout and the rounding are in q8.hpp.
//
// Scores multiply int8 by int8, as llama.cpp's q8_0 dot does: each query is quantized per block
// of 32 like a stored row (on the stack, kQ8Chunk blocks at a time), the codes are multiplied and
// summed exactly in int32 per block, and the blocks' sums are weighed by the two scales in float32.
// Weighted sums read the int8 values as float32, times each block's scale and the row's weight.
//
// Included by table-inl.hpp, inside the kernel file's namespace and target region. No include guard.

constexpr int64_t kQ8Chunk = 16;  // query blocks quantized at a time: 512 values
// Rows streamed from memory are read faster with their lines asked for this many bytes ahead (the
// hardware prefetcher alone, with keys and values read in turns, left int8 rows at half the read
// bandwidth); at 8 KB, a window streamed from DRAM took about 13% longer.
constexpr int64_t kQ8Ahead = 16384;

void f32_to_q8(uint8_t* y, const float* x, int64_t n) { q8_quantize_row(y, x, n); }

void q8_to_f32(float* y, const uint8_t* x, int64_t n) {
    const int8_t* codes = reinterpret_cast<const int8_t*>(x);
    for (int64_t b = 0, nb = q8_blocks(n); b < nb; ++b) {
        const float s = q8_scale(x, n, b);
        const int64_t end = (b + 1) * kQ8Block < n ? (b + 1) * kQ8Block : n;
        for (int64_t i = b * kQ8Block; i < end; ++i) y[i] = static_cast<float>(codes[i]) * s;
    }
}

// sum over n blocks of qs[b] * ks[b] * (the int32 dot of block b's codes qc and kc).
inline float q8_row_dot(const int8_t* qc, const float* qs, const int8_t* kc, const uint8_t* row, int64_t d,
                        int64_t first, int64_t n) {
    float acc = 0;
    for (int64_t b = 0; b < n; ++b) {
        int32_t dot = 0;
        for (int64_t i = 0; i < kQ8Block; ++i) dot += int32_t(qc[b * kQ8Block + i]) * kc[b * kQ8Block + i];
        acc += qs[b] * q8_scale(row, d, first + b) * static_cast<float>(dot);
    }
    return acc;
}

// The scores skeleton over a row dot: dot(qc, qs, kc, row, d, first, n) as q8_row_dot above, for
// blocks [first, first + n) of the row at `row` (kc: their codes).
template <class RowDot>
void q8_scores_with(RowDot dot, const float* q, int64_t q_stride, int64_t nq, const uint8_t* k, int64_t rows, int64_t d,
                    float scale, float* s, int64_t s_stride) {
    const int64_t nb = q8_blocks(d), row_bytes = q8_row_bytes(d);
    alignas(64) int8_t qc[kQ8Chunk * kQ8Block];
    float qs[kQ8Chunk];
    for (int64_t i = 0; i < nq; ++i) {
        float* si = s + i * s_stride;
        for (int64_t first = 0; first < nb; first += kQ8Chunk) {
            const int64_t n = nb - first < kQ8Chunk ? nb - first : kQ8Chunk;
            for (int64_t b = 0; b < n; ++b) {
                const int64_t at = (first + b) * kQ8Block, m = d - at < kQ8Block ? d - at : kQ8Block;
                qs[b] = scale * q8_quantize_block(q + i * q_stride + at, m, qc + b * kQ8Block);
            }
            for (int64_t j = 0; j < rows; ++j) {
                const uint8_t* row = k + j * row_bytes;
                if (first == 0) prefetch_l1(row + kQ8Ahead, row_bytes);
                const float part =
                    dot(qc, qs, reinterpret_cast<const int8_t*>(row) + first * kQ8Block, row, d, first, n);
                si[j] = first ? si[j] + part : part;
            }
        }
    }
}

void scores_q8(const float* q, int64_t q_stride, int64_t nq, const uint8_t* k, int64_t rows, int64_t d, float scale,
               float* s, int64_t s_stride) {
    q8_scores_with(q8_row_dot, q, q_stride, nq, k, rows, d, scale, s, s_stride);
}

void weighted_sum_q8(const float* p, int64_t p_stride, int64_t nq, const uint8_t* v, int64_t rows, int64_t d,
                     float* out, int64_t out_stride, bool add) {
    const int64_t nb = q8_blocks(d), row_bytes = q8_row_bytes(d);
    for (int64_t i = 0; i < nq; ++i) {
        float* o = out + i * out_stride;
        if (!add)
            for (int64_t c = 0; c < d; ++c) o[c] = 0;
        for (int64_t j = 0; j < rows; ++j) {
            const uint8_t* row = v + j * row_bytes;
            const int8_t* codes = reinterpret_cast<const int8_t*>(row);
            const float w = p[i * p_stride + j];
            for (int64_t b = 0; b < nb; ++b) {
                const float ws = w * q8_scale(row, d, b);
                const int64_t end = (b + 1) * kQ8Block < d ? (b + 1) * kQ8Block : d;
                for (int64_t c = b * kQ8Block; c < end; ++c) o[c] += ws * static_cast<float>(codes[c]);
            }
        }
    }
}

// The weighted sum in vectors, for a file whose traits W (simd-inl.hpp) also load int8 codes:
// W::load_i8(p) widens W::kLanes codes at p to float32. Rows of whole blocks only.
// o[0 : 32 NB] (+)= sum_j p_j v_j over blocks [first, first + NB) of the rows, in 32 NB / kLanes
// registers.
template <class W, int NB>
void q8_accumulate(const float* p, const uint8_t* v, int64_t rows, int64_t d, int64_t first, float* o, bool add) {
    constexpr int kPerBlock = kQ8Block / W::kLanes;
    typename W::F acc[kPerBlock * NB];
    KVFOLD_UNROLL(16)
    for (int t = 0; t < kPerBlock * NB; ++t) acc[t] = W::zero();
    const int64_t row_bytes = q8_row_bytes(d);
    for (int64_t j = 0; j < rows; ++j, v += row_bytes) {
        const int8_t* codes = reinterpret_cast<const int8_t*>(v) + kQ8Block * first;
        const float* ks = q8_scales(v, d) + first;
        if (first == 0) prefetch_l1(v + kQ8Ahead, row_bytes);  // the whole row: later passes find it
        KVFOLD_UNROLL(4)
        for (int b = 0; b < NB; ++b) {
            const typename W::F w = W::set1(p[j] * ks[b]);
            KVFOLD_UNROLL(4)
            for (int t = 0; t < kPerBlock; ++t) {
                const int at = kPerBlock * b + t;
                acc[at] = W::fma(w, W::load_i8(codes + W::kLanes * at), acc[at]);
            }
        }
    }
    KVFOLD_UNROLL(16)
    for (int t = 0; t < kPerBlock * NB; ++t) {
        typename W::F x = acc[t];
        if (add) x = W::add(x, W::load(o + W::kLanes * t));
        W::store(o + W::kLanes * t, x);
    }
}

// MaxBlocks (at most 4) blocks at a time, the rest in one call; rows with a partial block go to
// the plain loops above.
template <class W, int MaxBlocks>
void q8_weighted_sum_vectors(const float* p, int64_t p_stride, int64_t nq, const uint8_t* v, int64_t rows, int64_t d,
                             float* out, int64_t out_stride, bool add) {
    static_assert(MaxBlocks >= 1 && MaxBlocks <= 4, "by_blocks below holds up to 3");
    if (d % kQ8Block) return weighted_sum_q8(p, p_stride, nq, v, rows, d, out, out_stride, add);
    using Acc = void (*)(const float*, const uint8_t*, int64_t, int64_t, int64_t, float*, bool);
    static constexpr Acc by_blocks[4] = {nullptr, q8_accumulate<W, 1>, q8_accumulate<W, 2>, q8_accumulate<W, 3>};
    const int64_t nb = d / kQ8Block;
    for (int64_t i = 0; i < nq; ++i) {
        const float* pi = p + i * p_stride;
        float* o = out + i * out_stride;
        int64_t b = 0;
        for (; b + MaxBlocks <= nb; b += MaxBlocks)
            q8_accumulate<W, MaxBlocks>(pi, v, rows, d, b, o + kQ8Block * b, add);
        if (b < nb) by_blocks[nb - b](pi, v, rows, d, b, o + kQ8Block * b, add);
    }
}
