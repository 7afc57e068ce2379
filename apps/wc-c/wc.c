// Word count: for every word (maximal run of Unicode letters, case kept),
// the number of times it occurs. Same output as apps/wc (Rust) and the MIT
// 6.5840 lab's wc.go.
#include "mr.h"

static void wc_map(mr_str input, mr_str contents) {
    (void)input;
    mr_str word;
    while (mr_next_word(&contents, &word))
        mr_emit_u64(word, 1);
}

static mr_string wc_reduce(mr_str key, const mr_str *values, size_t n) {
    (void)key;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += mr_parse_u64(values[i]);
    return mr_string_u64(total);
}

// The combiner (run on map output before the shuffle) is the reduce; the
// values are counts, so the SDK adds them up in place as they are emitted.
MR_EXPORT_APP_SUM_U64(wc_map, wc_reduce, wc_reduce);
