#include "attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/kernels.hpp"

namespace kvfold {
namespace {

// A long visible set is read in blocks of kBlock rows: the keys of a block, then its values. Long
// blocks keep each a long sequential stream from memory; each switch between the key and value
// streams costs a ramp-up the sweep waits for (a 261-row window read in blocks of 64 was about 7%
// slower). A visible set of at most kShort rows is one block, taken side by side with others.
constexpr int64_t kBlock = 512;
constexpr int64_t kShort = 64;
constexpr int64_t kGroup = 8;  // query heads that share a pass over the rows

// A run of rows inside one segment.
struct Rows {
    const Segment* seg;
    int64_t first, count;
};

// Walks the visible set in runs that never cross a segment boundary.
class Cursor {
   public:
    Cursor(const Segment* segments, int count) : seg_(segments), end_(segments + count) {}
    // The next run of at most n rows; count == 0 at the end.
    Rows next(int64_t n) {
        if (at_end()) return {nullptr, 0, 0};
        Rows r{seg_, row_, std::min(n, seg_->rows - row_)};
        row_ += r.count;
        return r;
    }
    bool at_end() {
        skip_empty();
        return seg_ == end_;
    }

   private:
    void skip_empty() {
        while (seg_ != end_ && row_ == seg_->rows) {
            ++seg_;
            row_ = 0;
        }
    }

    const Segment* seg_ = nullptr;
    const Segment* end_ = nullptr;
    int64_t row_ = 0;
};

template <class T>
const T* rows_at(const void* base, int64_t first, int64_t d) {
    return static_cast<const T*>(base) + first * d;
}
const uint8_t* q8_rows_at(const void* base, int64_t first, int64_t d) {
    return static_cast<const uint8_t*>(base) + first * q8_row_bytes(d);
}

void score_kernel(const Kernels& K, const Rows& r, const float* q, int64_t q_stride, int64_t nq, int64_t dk,
                  float scale, float* s, int64_t s_stride) {
    const void* keys = r.seg->keys;
    switch (r.seg->dtype) {
        case DType::float16:
            return K.scores_f16(q, q_stride, nq, rows_at<uint16_t>(keys, r.first, dk), r.count, dk, scale, s, s_stride);
        case DType::bfloat16:
            return K.scores_bf16(q, q_stride, nq, rows_at<uint16_t>(keys, r.first, dk), r.count, dk, scale, s,
                                 s_stride);
        case DType::int8:
            return K.scores_q8(q, q_stride, nq, q8_rows_at(keys, r.first, dk), r.count, dk, scale, s, s_stride);
        default:
            return K.scores_f32(q, q_stride, nq, rows_at<float>(keys, r.first, dk), r.count, dk, scale, s, s_stride);
    }
}

// Scores of a run of rows for nq queries (s_stride apart), with the segment's logit bias if it has one.
void score_rows(const Kernels& K, const Rows& r, const float* q, int64_t q_stride, int64_t nq, int64_t dk, float scale,
                float* s, int64_t s_stride) {
    score_kernel(K, r, q, q_stride, nq, dk, scale, s, s_stride);
    if (const float* bias = r.seg->bias)
        for (int64_t i = 0; i < nq; ++i)
            for (int64_t j = 0; j < r.count; ++j) s[i * s_stride + j] += bias[r.first + j];
}

void weigh_rows(const Kernels& K, const Rows& r, const float* p, int64_t p_stride, int64_t nq, int64_t dv, float* out,
                int64_t out_stride, bool add) {
    const void* values = r.seg->values;
    switch (r.seg->dtype) {
        case DType::float16:
            return K.weighted_sum_f16(p, p_stride, nq, rows_at<uint16_t>(values, r.first, dv), r.count, dv, out,
                                      out_stride, add);
        case DType::bfloat16:
            return K.weighted_sum_bf16(p, p_stride, nq, rows_at<uint16_t>(values, r.first, dv), r.count, dv, out,
                                       out_stride, add);
        case DType::int8:
            return K.weighted_sum_q8(p, p_stride, nq, q8_rows_at(values, r.first, dv), r.count, dv, out, out_stride,
                                     add);
        default:
            return K.weighted_sum_f32(p, p_stride, nq, rows_at<float>(values, r.first, dv), r.count, dv, out,
                                      out_stride, add);
    }
}

int64_t visible_rows(const Attention& a) {
    int64_t n = 0;
    for (int s = 0; s < a.count; ++s) n += a.segments[s].rows;
    return n;
}

// A short visible set (at most kShort rows: every decode step of a summary memory or a short
// window) is one block: its scores, one softmax, and the weighted values, segment after segment.
void score_short(const Kernels& K, const Attention& a, int64_t dk, float scale, float* s) {
    for (int64_t seg = 0, at = 0; seg < a.count; at += a.segments[seg++].rows)
        if (a.segments[seg].rows)
            score_rows(K, Rows{&a.segments[seg], 0, a.segments[seg].rows}, a.q, a.q_stride, a.nq, dk, scale, s + at,
                       kShort);
}

// Adds the weights p (nq rows of kShort, the visible set's rows in order) of the segments that record them.
void record_short(const Attention& a, const float* p) {
    for (int64_t seg = 0, at = 0; seg < a.count; at += a.segments[seg++].rows) {
        float* w = a.segments[seg].weights;
        if (!w) continue;
        for (int64_t i = 0; i < a.nq; ++i)
            for (int64_t j = 0; j < a.segments[seg].rows; ++j) w[j] += a.weight_share * p[i * kShort + at + j];
    }
}

void weigh_short(const Kernels& K, const Attention& a, int64_t dv, const float* p) {
    for (int64_t seg = 0, at = 0; seg < a.count; at += a.segments[seg++].rows)
        if (a.segments[seg].rows)
            weigh_rows(K, Rows{&a.segments[seg], 0, a.segments[seg].rows}, p + at, kShort, a.nq, dv, a.out,
                       a.out_stride, at > 0);
}

// Scores of the next block of up to kBlock rows, which may span several segments, into
// s (kBlock apart per query). Returns the rows scored; 0 when the cursor is at the end.
int64_t score_block(const Kernels& K, Cursor& cursor, const Attention& a, int64_t dk, float scale, float* s) {
    int64_t filled = 0;
    for (Rows r; filled < kBlock && (r = cursor.next(kBlock - filled)).count; filled += r.count)
        score_rows(K, r, a.q, a.q_stride, a.nq, dk, scale, s + filled, kBlock);
    return filled;
}

// Adds (or, when !add, writes) the value rows of the block that starts at `from`, weighted by p.
void weigh_block(const Kernels& K, Cursor from, int64_t filled, const float* p, const Attention& a, int64_t dv,
                 bool add) {
    for (int64_t done = 0; done < filled; add = true) {
        Rows r = from.next(filled - done);
        weigh_rows(K, r, p + done, kBlock, a.nq, dv, a.out, a.out_stride, add);
        done += r.count;
    }
}

// The weights of a long visible set, for the segments that record them: each block's weights are
// exp(s - m_b) against the running max m_b after it; kept (per query) with m_b until the final max
// and total are known, then scaled by exp(m_b - m_final) / total and added.
class LongWeights {
   public:
    // Keeps the block's weights of recording rows (scores: nq rows of kBlock).
    void keep(Cursor block, int64_t filled, const float* scores, const float* running_max, int64_t nq) {
        for (int64_t done = 0; done < filled;) {
            const Rows r = block.next(filled - done);
            if (r.seg->weights) {
                Run run{r.seg->weights + r.first, r.count, at_, {}};
                for (int64_t i = 0; i < nq; ++i) {
                    run.max[i] = running_max[i];
                    kept_.insert(kept_.end(), scores + i * kBlock + done, scores + i * kBlock + done + r.count);
                }
                runs_.push_back(run);
                at_ += nq * r.count;
            }
            done += r.count;
        }
    }
    void add(const float* final_max, const float* total, int64_t nq, float share) {
        for (const Run& run : runs_)
            for (int64_t i = 0; i < nq; ++i) {
                const float f = share * std::exp(run.max[i] - final_max[i]) / total[i];
                const float* p = kept_.data() + run.at + i * run.count;
                for (int64_t j = 0; j < run.count; ++j) run.weights[j] += f * p[j];
            }
        runs_.clear();
        kept_.clear();
        at_ = 0;
    }

   private:
    struct Run {
        float* weights;
        int64_t count, at;
        float max[kGroup];
    };
    std::vector<Run> runs_;
    std::vector<float> kept_;
    int64_t at_ = 0;
};

bool records(const Attention& a) {
    for (int s = 0; s < a.count; ++s)
        if (a.segments[s].weights && a.segments[s].rows) return true;
    return false;
}

// A long visible set: blocks of kBlock rows merged by an online softmax. Each block's weights are
// taken against the running max; the output and the total are rescaled whenever the max grows,
// and divided by the total at the end.
void attend_long(const Kernels& K, const Attention& a, int64_t dk, int64_t dv, float scale) {
    float scores[kGroup * kBlock];
    float running_max[kGroup], total[kGroup];
    for (int64_t i = 0; i < a.nq; ++i) {
        running_max[i] = -std::numeric_limits<float>::infinity();
        total[i] = 0;
    }
    thread_local LongWeights weights;  // grows once per thread, then allocates nothing
    const bool record = records(a);
    Cursor cursor(a.segments, a.count);
    for (bool add = false;; add = true) {
        const Cursor block = cursor;
        const int64_t filled = score_block(K, cursor, a, dk, scale, scores);
        if (filled == 0) break;
        for (int64_t i = 0; i < a.nq; ++i)
            K.softmax_block(scores + i * kBlock, filled, &running_max[i], &total[i], a.out + i * a.out_stride, dv);
        if (record) weights.keep(block, filled, scores, running_max, a.nq);
        weigh_block(K, block, filled, scores, a, dv, add);
    }
    for (int64_t i = 0; i < a.nq; ++i) K.scale(a.out + i * a.out_stride, 1.0f / total[i], dv);
    if (record) weights.add(running_max, total, a.nq, a.weight_share);
}

// One visible row: the softmax gives it weight exp(0) / exp(0) = 1 exactly, so every query reads
// its value as stored; scoring it would change nothing.
void attend_one_row(const Attention& a, int64_t dv) {
    for (int s = 0; s < a.count; ++s)
        if (a.segments[s].rows) {
            for (int64_t i = 0; i < a.nq; ++i)
                load_row(a.out + i * a.out_stride, a.segments[s].values, dv, a.segments[s].dtype);
            if (a.segments[s].weights) a.segments[s].weights[0] += a.weight_share * static_cast<float>(a.nq);
        }
}

constexpr int kBatch = 4;  // problems taken through each step together

// At most kBatch problems of at most kGroup query heads each. The short ones go step by step side
// by side, so that their short dependency chains overlap.
void attend_batch(const Kernels& K, const Attention* problems, int count, int64_t dk, int64_t dv, float scale) {
    float scores[kBatch][kGroup * kShort];
    int64_t rows[kBatch];
    for (int p = 0; p < count; ++p) {
        rows[p] = visible_rows(problems[p]);
        if (rows[p] > 1 && rows[p] <= kShort) score_short(K, problems[p], dk, scale, scores[p]);
    }
    for (int p = 0; p < count; ++p)
        if (rows[p] > 1 && rows[p] <= kShort)
            for (int64_t i = 0; i < problems[p].nq; ++i) K.softmax(scores[p] + i * kShort, rows[p]);
    for (int p = 0; p < count; ++p) {
        const Attention& a = problems[p];
        if (rows[p] == 0)
            for (int64_t i = 0; i < a.nq; ++i) std::memset(a.out + i * a.out_stride, 0, sizeof(float) * dv);
        else if (rows[p] == 1)
            attend_one_row(a, dv);
        else if (rows[p] <= kShort) {
            record_short(a, scores[p]);
            weigh_short(K, a, dv, scores[p]);
        } else
            attend_long(K, a, dk, dv, scale);
    }
}

}  // namespace

void attend(const Attention* problems, int count, int64_t dk, int64_t dv, float scale) {
    const Kernels& K = kernels();
    // Problems are cut into pieces of at most kGroup query heads, and taken kBatch pieces at a time.
    Attention batch[kBatch];
    int n = 0;
    for (int p = 0; p < count; ++p) {
        const Attention& a = problems[p];
        for (int64_t first = 0; first < a.nq; first += kGroup) {
            batch[n++] = Attention{a.q + first * a.q_stride,
                                   a.q_stride,
                                   std::min(kGroup, a.nq - first),
                                   a.segments,
                                   a.count,
                                   a.out + first * a.out_stride,
                                   a.out_stride,
                                   a.weight_share};
            if (n == kBatch) {
                attend_batch(K, batch, n, dk, dv, scale);
                n = 0;
            }
        }
    }
    if (n) attend_batch(K, batch, n, dk, dv, scale);
}

void store_row(void* dst, const float* src, int64_t d, DType dtype) {
    switch (dtype) {
        case DType::float16: return kernels().f32_to_f16(static_cast<uint16_t*>(dst), src, d);
        case DType::bfloat16: return kernels().f32_to_bf16(static_cast<uint16_t*>(dst), src, d);
        case DType::int8: return kernels().f32_to_q8(static_cast<uint8_t*>(dst), src, d);
        default: std::memcpy(dst, src, sizeof(float) * d);
    }
}

void load_row(float* dst, const void* src, int64_t d, DType dtype) {
    switch (dtype) {
        case DType::float16: return kernels().f16_to_f32(dst, static_cast<const uint16_t*>(src), d);
        case DType::bfloat16: return kernels().bf16_to_f32(dst, static_cast<const uint16_t*>(src), d);
        case DType::int8: return kernels().q8_to_f32(dst, static_cast<const uint8_t*>(src), d);
        default: std::memcpy(dst, src, sizeof(float) * d);
    }
}

}  // namespace kvfold
