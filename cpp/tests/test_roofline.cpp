// The roofline's measuring loops return plausible rates, and its byte and FLOP counts follow the
// formulas for cases worked out by hand.
#include <cmath>
#include <string>

#include "../src/roofline.hpp"
#include "check.hpp"
#include "kvfold/kvfold.hpp"

using namespace kvfold;

TEST(roofline_fma_peak_is_plausible_for_every_backend) {
    for (const std::string& name : available_backends()) {
        const double peak = roofline::fma_peak(name, 0.02);
        // Between 1 MFLOP/s (an emulator, or valgrind on a busy core) and 10 TFLOP/s on one core.
        CHECK(std::isfinite(peak) && peak > 1e6 && peak < 1e13);
    }
    bool refused = false;
    try {
        roofline::fma_peak("no such backend", 0.01);
    } catch (const ValueError& e) {
        refused = std::string(e.what()).find("no such backend") != std::string::npos;
    }
    CHECK(refused);
}

TEST(roofline_read_loop_reads_whole_blocks_at_least_8_mb_a_call) {
    const roofline::ReadLoop small(1000), large(int64_t(3) << 20);
    CHECK(small.bytes() == 1024 && small.passes() == 8192);  // blocks of 8 512-bit vectors
    CHECK(large.bytes() == int64_t(3) << 20 && large.passes() == 2);
    small.read();
    bool refused = false;
    try {
        roofline::ReadLoop(63);
    } catch (const ValueError& e) {
        refused =
            std::string(e.what()).find("bytes: expected a buffer size in [64, 2^36], got 63") != std::string::npos;
    }
    CHECK(refused);
}

TEST(roofline_step_work_follows_the_formulas) {
    // A window of 256 and 4 sinks, float32, H = 32, d = 128, one decode step: 261 rows (sinks,
    // window, the slot) of keys and values read, a score and a weighted sum per element.
    const double Hd = 32.0 * 128;
    auto w = roofline::step_work("cumulative", 32, 128, 256, 4, 4, 1);
    CHECK_NEAR(w.flops, 4 * Hd * 261, 0.5);
    CHECK_NEAR(w.bytes, Hd * (12 + 8 * 261 + 16), 0.5);  // q, k, v; the rows; the float64 sums
    CHECK_NEAR(w.footprint, Hd * (8 * 261 + 16), 0.5);
    // float16 storage halves the rows' bytes, not the FLOPs.
    auto h = roofline::step_work("cumulative", 32, 128, 256, 4, 2, 1);
    CHECK_NEAR(h.flops, w.flops, 0.5);
    CHECK_NEAR(h.bytes, Hd * (12 + 4 * 261 + 16), 0.5);
    // Drop keeps no slot and folds nothing.
    auto drop = roofline::step_work("drop", 32, 128, 4096, 4, 4, 1);
    CHECK_NEAR(drop.bytes, Hd * (12 + 8 * 4100), 0.5);
    // Linear: 2 d^2 multiply-adds per token and head; S (64 KB per head) read.
    auto lin = roofline::step_work("linear", 32, 128, 0, 0, 4, 1);
    CHECK_NEAR(lin.flops, 4 * 32.0 * 128 * 128, 0.5);
    CHECK_NEAR(lin.bytes, Hd * 12 + 4 * 32.0 * 128 * 128, 0.5);
    // GatedDelta prefill: 3 d^2 multiply-adds per token and head; S read once.
    auto gd = roofline::step_work("gated_delta", 32, 128, 0, 0, 4, 2048);
    CHECK_NEAR(gd.flops, 6 * 32.0 * 128 * 128, 0.5);
    CHECK_NEAR(gd.bytes, Hd * 12 + 4 * 32.0 * 128 * 128 / 2048, 1e-6);
    // A prefill of 4 tokens, window 2, no sinks, Cumulative: tokens see 1, 2, 2 + slot, 2 + slot rows.
    auto p = roofline::step_work("cumulative", 1, 8, 2, 0, 4, 4);
    CHECK_NEAR(p.flops, 4 * 8 * (1 + 2 + 3 + 3) / 4.0, 1e-9);
    bool refused = false;
    try {
        roofline::step_work("gru", 32, 128, 0, 0, 4, 1);
    } catch (const ValueError& e) {
        refused = std::string(e.what()).find("gru") != std::string::npos;
    }
    CHECK(refused);
}
