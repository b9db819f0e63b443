// int8 (q8_0) rows: the same bits from every table, within half a step of the float32 values, and
// scores and weighted sums that are the int8 x int8 products and the float32 sums they stand for.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "../src/attention.hpp"
#include "../src/kernels/kernels.hpp"
#include "check.hpp"
#include "fixtures.hpp"

using namespace kvfold;

namespace {
using fixtures::normal;
const int64_t kDims[] = {1, 3, 7, 17, 31, 32, 33, 64, 100, 127, 128, 300, 600};

std::vector<uint8_t> quantized(const std::vector<float>& x, int64_t rows, int64_t d) {
    std::vector<uint8_t> y(rows * q8_row_bytes(d));
    for (int64_t j = 0; j < rows; ++j) scalar_kernels()->f32_to_q8(y.data() + j * q8_row_bytes(d), &x[j * d], d);
    return y;
}
std::vector<float> dequantized(const std::vector<uint8_t>& y, int64_t rows, int64_t d) {
    std::vector<float> x(rows * d);
    for (int64_t j = 0; j < rows; ++j) scalar_kernels()->q8_to_f32(&x[j * d], y.data() + j * q8_row_bytes(d), d);
    return x;
}
}  // namespace

TEST(q8_rows_round_alike_in_every_table) {
    const Kernels& K = kernels();
    for (int64_t d : kDims) {
        auto x = normal(d, 7, 3.0f);
        x[d / 2] *= 40;  // one large value: its block's step is coarse, the other blocks' are not
        const int64_t bytes = q8_row_bytes(d);
        CHECK(bytes == (d + 31) / 32 * 36);
        std::vector<uint8_t> a(bytes, 0xAB), b(bytes, 0xCD);
        scalar_kernels()->f32_to_q8(a.data(), x.data(), d);
        K.f32_to_q8(b.data(), x.data(), d);
        CHECK(a == b);
        std::vector<float> back(d), back2(d);
        scalar_kernels()->q8_to_f32(back.data(), a.data(), d);
        K.q8_to_f32(back2.data(), a.data(), d);
        CHECK(std::memcmp(back.data(), back2.data(), sizeof(float) * d) == 0);
        for (int64_t blk = 0; blk < q8_blocks(d); ++blk) {
            float largest = 0;
            for (int64_t i = blk * 32; i < std::min(d, blk * 32 + 32); ++i)
                largest = std::max(largest, std::fabs(x[i]));
            const float step = q8_scale(a.data(), d, blk);
            CHECK(step == largest / 127.0f);
            for (int64_t i = blk * 32; i < std::min(d, blk * 32 + 32); ++i) {
                CHECK(std::fabs(back[i] - x[i]) <= 0.5f * step * 1.0001f);
                CHECK(std::fabs(static_cast<float>(reinterpret_cast<const int8_t*>(a.data())[i])) <= 127);
            }
            for (int64_t i = std::min(d, blk * 32 + 32); i < blk * 32 + 32; ++i) CHECK(a[i] == 0);  // padding
        }
    }
}

TEST(q8_blocks_of_zeros_tiny_or_nonfinite_values) {
    const Kernels& K = kernels();
    std::vector<float> x(64, 0.0f);
    x[40] = 1e-37f;  // below 127 * FLT_MIN: 1 / scale would overflow
    std::vector<uint8_t> y(q8_row_bytes(64));
    K.f32_to_q8(y.data(), x.data(), 64);
    CHECK(q8_scale(y.data(), 64, 0) == 0 && q8_scale(y.data(), 64, 1) == 0);
    for (int i = 0; i < 64; ++i) CHECK(y[i] == 0);
    x[3] = INFINITY;
    x[40] = NAN;
    x[41] = 2.0f;
    K.f32_to_q8(y.data(), x.data(), 64);
    CHECK(std::isnan(q8_scale(y.data(), 64, 0)) && std::isnan(q8_scale(y.data(), 64, 1)));
    for (int i = 0; i < 64; ++i) CHECK(y[i] == 0);
}

// Scores: the float64 dot of the query rounded like a row and the stored keys; weighted sums: the
// float64 sum over the stored values.
TEST(q8_scores_and_weighted_sums) {
    const Kernels& K = kernels();
    const float scale = 0.37f;
    for (int64_t d : kDims)
        for (int64_t rows : {1, 5, 64}) {
            const int64_t nq = d % 2 ? 3 : 1;
            auto keys = normal(rows * d, 11 + d);
            auto queries = normal(nq * d, 13 + d);
            const auto stored = quantized(keys, rows, d);
            const auto k = dequantized(stored, rows, d);
            const auto q = dequantized(quantized(queries, nq, d), nq, d);
            std::vector<float> s(nq * 70, NAN);
            K.scores_q8(queries.data(), d, nq, stored.data(), rows, d, scale, s.data(), 70);
            for (int64_t i = 0; i < nq; ++i)
                for (int64_t j = 0; j < rows; ++j) {
                    double want = 0, size = 0;
                    for (int64_t c = 0; c < d; ++c) {
                        want += double(q[i * d + c]) * k[j * d + c];
                        size += std::fabs(double(q[i * d + c]) * k[j * d + c]);
                    }
                    CHECK(std::fabs(s[i * 70 + j] - scale * want) <= 1e-5 * scale * size + 1e-30);
                }
            auto p = normal(nq * 70, 17 + d);
            for (float& w : p) w = std::fabs(w);
            for (bool add : {false, true}) {
                std::vector<float> out(nq * (d + 2), 0.5f);
                K.weighted_sum_q8(p.data(), 70, nq, stored.data(), rows, d, out.data(), d + 2, add);
                for (int64_t i = 0; i < nq; ++i) {
                    for (int64_t c = 0; c < d; ++c) {
                        double want = add ? 0.5 : 0, size = add ? 0.5 : 0;
                        for (int64_t j = 0; j < rows; ++j) {
                            want += double(p[i * 70 + j]) * k[j * d + c];
                            size += std::fabs(double(p[i * 70 + j]) * k[j * d + c]);
                        }
                        CHECK(std::fabs(out[i * (d + 2) + c] - want) <= 1e-5 * size + 1e-30);
                    }
                    CHECK(out[i * (d + 2) + d] == 0.5f && out[i * (d + 2) + d + 1] == 0.5f);  // past d: untouched
                }
            }
        }
}

// attend() over int8 sinks and window around a float32 slot, short and long visible sets.
TEST(q8_attention_is_the_softmax_of_the_stored_rows) {
    const float scale = 0.3f;
    const int64_t shapes[][5] = {{64, 64, 2, 3, 60}, {33, 17, 1, 0, 200}, {128, 128, 4, 1, 130}, {7, 5, 3, 2, 1}};
    for (auto& shape : shapes) {
        const int64_t dk = shape[0], dv = shape[1], nq = shape[2], sinks = shape[3], window = shape[4];
        auto sk = normal(sinks * dk, 1), sv = normal(sinks * dv, 2), wk = normal(window * dk, 3),
             wv = normal(window * dv, 4);
        auto mk = normal(dk, 5), mv = normal(dv, 6), queries = normal(nq * dk, 7);
        auto qsk = quantized(sk, sinks, dk), qsv = quantized(sv, sinks, dv), qwk = quantized(wk, window, dk),
             qwv = quantized(wv, window, dv);
        Segment segs[3] = {{qsk.data(), qsv.data(), sinks, DType::int8},
                           {mk.data(), mv.data(), 1, DType::float32},
                           {qwk.data(), qwv.data(), window, DType::int8}};
        std::vector<float> out(nq * dv, NAN);
        Attention problem{queries.data(), dk, nq, segs, 3, out.data(), dv};
        attend(&problem, 1, dk, dv, scale);
        const auto q = dequantized(quantized(queries, nq, dk), nq, dk);  // the query as scores_q8 reads it
        std::vector<const float*> keys, values;
        const auto ksk = dequantized(qsk, sinks, dk), ksv = dequantized(qsv, sinks, dv);
        const auto kwk = dequantized(qwk, window, dk), kwv = dequantized(qwv, window, dv);
        for (int64_t j = 0; j < sinks; ++j) keys.push_back(&ksk[j * dk]), values.push_back(&ksv[j * dv]);
        keys.push_back(mk.data()), values.push_back(mv.data());
        for (int64_t j = 0; j < window; ++j) keys.push_back(&kwk[j * dk]), values.push_back(&kwv[j * dv]);
        for (int64_t i = 0; i < nq; ++i) {
            std::vector<double> s;
            double m = -INFINITY, total = 0;
            for (size_t j = 0; j < keys.size(); ++j) {
                double dot = 0;
                // the float32 slot's key meets the float32 query, the int8 rows the rounded one
                const float* qi = (j == static_cast<size_t>(sinks) ? queries.data() : q.data()) + i * dk;
                for (int64_t c = 0; c < dk; ++c) dot += double(qi[c]) * keys[j][c];
                s.push_back(dot * scale);
                m = std::max(m, s.back());
            }
            for (double& x : s) total += (x = std::exp(x - m));
            for (int64_t c = 0; c < dv; ++c) {
                double want = 0;
                for (size_t j = 0; j < keys.size(); ++j) want += s[j] / total * values[j][c];
                CHECK_NEAR(out[i * dv + c], want, 2e-5);
            }
        }
    }
}
