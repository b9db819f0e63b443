// The C API's state: a cache saved to bytes and restored, a checkpoint and a rollback, each
// agreeing with the cache it came from.
#include <cstring>
#include <vector>

#include "c_api_fixtures.hpp"
#include "check.hpp"
#include "kvfold/kvfold.h"
#include "kvfold/kvfold.hpp"

using namespace c_api_fixtures;

TEST(c_api_state_round_trips_through_bytes) {
    kvfold_config c = small_config();
    c.dtype = KVFOLD_FLOAT16;
    kvfold_cache* cache = create(c, CRule("moving", {{"n", {2}}}));
    REQUIRE(cache != nullptr);
    const int64_t T = 7;
    auto k = normal(2 * 2 * T * 5, 9), v = normal(2 * 2 * T * 3, 10), q = normal(2 * 4 * 5, 11);
    CHECK(kvfold_update(cache, k.data(), v.data(), T, nullptr) == KVFOLD_OK);

    size_t size = 0;
    CHECK(kvfold_to_bytes(cache, nullptr, 0, &size) == KVFOLD_OK);
    CHECK(size > 0);
    std::vector<uint8_t> small(size - 1, 0xAB);
    size_t reported = 0;
    CHECK(kvfold_to_bytes(cache, small.data(), small.size(), &reported) == KVFOLD_VALUE_ERROR);
    CHECK(reported == size);
    CHECK(small == std::vector<uint8_t>(size - 1, 0xAB));
    const auto bytes = bytes_of(cache);
    CHECK(bytes.size() == size);
    void* data = nullptr;
    size_t alloc_size = 0;
    CHECK(kvfold_to_bytes_alloc(cache, &data, &alloc_size) == KVFOLD_OK);
    CHECK(data != nullptr && alloc_size == size && std::memcmp(data, bytes.data(), size) == 0);
    kvfold_free_bytes(data);

    kvfold_cache* copy = nullptr;
    CHECK(kvfold_from_bytes(bytes.data(), bytes.size(), &copy) == KVFOLD_OK);
    CHECK(copy != nullptr);
    if (copy) {
        kvfold_config got;
        CHECK(kvfold_get_config(copy, &got) == KVFOLD_OK);
        CHECK(got.batch_size == 2 && got.num_query_heads == 4 && got.window == 3 && got.sinks == 1 &&
              got.dtype == KVFOLD_FLOAT16 && got.check_finite == 1);
        std::vector<float> o1(2 * 4 * 3), o2(o1.size());
        CHECK(kvfold_attend(cache, q.data(), o1.data()) == KVFOLD_OK);
        CHECK(kvfold_attend(copy, q.data(), o2.data()) == KVFOLD_OK);
        CHECK(o1 == o2);
        kvfold_free(copy);
    }
    // Damaged bytes: an error naming the problem, no cache.
    auto damaged = bytes;
    damaged[damaged.size() / 2] ^= 0x5A;
    copy = reinterpret_cast<kvfold_cache*>(&c);
    CHECK(kvfold_from_bytes(damaged.data(), damaged.size(), &copy) == KVFOLD_VALUE_ERROR);
    CHECK(copy == nullptr);
    CHECK(std::strlen(kvfold_last_error(nullptr)) > 0);
    CHECK(kvfold_from_bytes(bytes.data(), 10, &copy) == KVFOLD_VALUE_ERROR);
    kvfold_free(cache);
}

TEST(c_api_checkpoint_and_rollback) {
    const kvfold_config c = small_config();
    kvfold_cache* cache = create(c, CRule("weighted", {{"betas", {0.5, 1.0, 2.0}}}));
    REQUIRE(cache != nullptr);
    const int64_t T = 4;
    auto k = normal(2 * 2 * T * 5, 12), v = normal(2 * 2 * T * 3, 13);
    CHECK(kvfold_update(cache, k.data(), v.data(), T, nullptr) == KVFOLD_OK);
    const auto at_checkpoint = bytes_of(cache);
    kvfold_checkpoint* cp = nullptr;
    CHECK(kvfold_checkpoint_new(cache, &cp) == KVFOLD_OK && cp != nullptr);
    CHECK(kvfold_update(cache, v.data(), v.data(), 2, nullptr) == KVFOLD_OK);
    CHECK(bytes_of(cache) != at_checkpoint);
    CHECK(kvfold_rollback(cache, cp) == KVFOLD_OK);
    CHECK(bytes_of(cache) == at_checkpoint);

    // Per row: row 1 goes back, row 0 keeps its new tokens.
    CHECK(kvfold_update(cache, k.data(), v.data(), T, nullptr) == KVFOLD_OK);
    int64_t row = 1, lengths[2];
    CHECK(kvfold_rollback_rows(cache, cp, &row, 1) == KVFOLD_OK);
    CHECK(kvfold_lengths(cache, lengths, 2) == KVFOLD_OK);
    CHECK(lengths[0] == 2 * T && lengths[1] == T);
    row = 3;
    CHECK(kvfold_rollback_rows(cache, cp, &row, 1) == KVFOLD_VALUE_ERROR);

    // A checkpoint outlives its cache, and fits only a cache of the same configuration.
    kvfold_free(cache);
    kvfold_cache* other = create(c, CRule("weighted", {{"betas", {0.5, 1.0, 2.0}}}));
    CHECK(other && kvfold_rollback(other, cp) == KVFOLD_OK && bytes_of(other) == at_checkpoint);
    kvfold_config wider = c;
    wider.window = 4;
    kvfold_cache* different = create(wider, CRule("weighted", {{"betas", {0.5, 1.0, 2.0}}}));
    CHECK(different && kvfold_rollback(different, cp) == KVFOLD_VALUE_ERROR);
    CHECK(different && contains(kvfold_last_error(different), "window"));
    kvfold_free(different);

    // reset and reset_rows
    CHECK(kvfold_reset(other) == KVFOLD_OK);
    CHECK(kvfold_lengths(other, lengths, 2) == KVFOLD_OK && lengths[0] == 0 && lengths[1] == 0);
    CHECK(kvfold_update(other, k.data(), v.data(), T, nullptr) == KVFOLD_OK);
    row = 0;
    CHECK(kvfold_reset_rows(other, &row, 1) == KVFOLD_OK);
    CHECK(kvfold_lengths(other, lengths, 2) == KVFOLD_OK && lengths[0] == 0 && lengths[1] == T);
    kvfold_free(other);
    kvfold_checkpoint_free(cp);
}
