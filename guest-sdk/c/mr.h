// The C SDK for `mr` apps: write three functions, export them with
// MR_EXPORT_APP, build with `make` (guest-sdk/c/mr.mk; see apps/wc-c).
//
//   #include "mr.h"
//
//   static void wc_map(mr_str input, mr_str contents) {
//       mr_str word;
//       while (mr_next_word(&contents, &word))
//           mr_emit(word, MR_STR("1"));
//   }
//
//   static mr_string wc_reduce(mr_str key, const mr_str *values, size_t n) {
//       uint64_t total = 0;
//       for (size_t i = 0; i < n; i++)
//           total += mr_parse_u64(values[i]);
//       return mr_string_u64(total);
//   }
//
//   MR_EXPORT_APP(wc_map, wc_reduce, wc_reduce);  // the combiner is the reduce
//
// (apps/wc-c declares its values counts instead: MR_EXPORT_APP_SUM_U64 and
// mr_emit_u64, so the SDK adds them up in place.)
//
// What the SDK does for the app, as the Rust SDK does:
// - Batching: mr_emit encodes pairs into a buffer handed to the host in
//   batches of up to 8192 records or 1 MiB (mr:app@0.2.0's encoding).
// - Combining: with a combiner, map output is combined inside the guest
//   before it is emitted, in a hash table of bounded size.
// - Progress: every few thousand pairs, mr_emit looks at where the pair's
//   key (or value) lies in the map's contents; when it points into them, as
//   mr_next_word's words do, the host hears how far the map is. This
//   assumes keys come roughly in input order, as a map that scans its
//   input emits them; apps that emit text of their own, or out of order,
//   call mr_progress instead (which turns the SDK's reports off).
// - Streaming keys: the host may deliver a key with very many values in
//   several groups; the SDK gathers them and calls reduce once, or hands
//   them one at a time to the app's fold (MR_EXPORT_APP_FOLD), in memory
//   that does not grow with their number.
// - Failing: mr_fail (or abort) fails the task; what the app printed to
//   stderr is quoted in the error.
//
// Strings are UTF-8 and not NUL-terminated: an mr_str is borrowed (valid
// during the call), an mr_string is owned (malloc'd; returning it hands it
// to the SDK).

#ifndef MR_H
#define MR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// A borrowed string: `len` bytes of UTF-8 at `ptr`.
typedef struct {
    const char *ptr;
    size_t len;
} mr_str;

/// An owned string: `len` bytes at `ptr`, allocated with malloc.
typedef struct {
    char *ptr;
    size_t len;
} mr_string;

/// An mr_str of a string literal.
#define MR_STR(lit) ((mr_str){(lit), sizeof(lit) - 1})

/// An mr_str of a NUL-terminated string.
mr_str mr_str_c(const char *s);

/// Whether two strings have the same bytes.
bool mr_str_eq(mr_str a, mr_str b);

/// A malloc'd copy of `s`.
mr_string mr_string_copy(mr_str s);

/// The decimal digits of `n`, malloc'd.
mr_string mr_string_u64(uint64_t n);

/// The value of a decimal number; fails the task (mr_fail) if `s` is not
/// one or does not fit in 64 bits.
uint64_t mr_parse_u64(mr_str s);

/// Maps one input (or one split of it, cut at a line boundary): calls
/// mr_emit for every output pair. `input` is the input's name exactly as the
/// user gave it.
typedef void (*mr_map_fn)(mr_str input, mr_str contents);

/// Reduces all `n` values of one key to the output value. Values arrive in
/// an order that depends on scheduling.
typedef mr_string (*mr_reduce_fn)(mr_str key, const mr_str *values, size_t n);

/// The optional combiner: merges some values of a key into one before the
/// shuffle. It must be safe to apply any number of times (for word count it
/// is the reduce).
typedef mr_string (*mr_combine_fn)(mr_str key, const mr_str *values, size_t n);

/// What the combiner does, for the SDK to do it faster inside the guest:
/// MR_COMBINE_TEXT calls the app's combine on strings; MR_COMBINE_SUM_U64
/// declares that values are decimal 64-bit counts and combining adds them
/// up (word count), so the SDK folds each emitted count into a number per
/// key without calling combine (which must still sum: the host calls it
/// on spills).
typedef enum { MR_COMBINE_TEXT = 0, MR_COMBINE_SUM_U64 = 1 } mr_combiner;

/// The streaming reduce (Hadoop's reducer over an iterator, Spark's
/// aggregateByKey), for keys that may have more values than fit in memory:
/// `start` makes the app's state for a key, `add` takes the key's values one
/// at a time as the host delivers them, and `finish` gives the output value
/// and frees the state. Memory stays the state's own however many values a
/// key has.
typedef struct {
    void *(*start)(mr_str key);
    void (*add)(void *state, mr_str value);
    mr_string (*finish)(void *state);
} mr_fold;

/// An app: its map, reduce and (or NULL) combine functions, what the
/// combiner does, and its fold (all NULL unless exported with
/// MR_EXPORT_APP_FOLD, which leaves `reduce` NULL).
typedef struct {
    mr_map_fn map;
    mr_reduce_fn reduce;
    mr_combine_fn combine;
    mr_combiner combiner;
    mr_fold fold;
} mr_app;

/// Exports the app; use once, at file scope. `combine` may be NULL.
#define MR_EXPORT_APP(map, reduce, combine)                                                        \
    const mr_app mr_the_app = {(map), (reduce), (combine), MR_COMBINE_TEXT, {NULL, NULL, NULL}}

/// Exports an app whose values are counts that its combiner adds up (see
/// mr_combiner); emit them with mr_emit_u64 (or mr_emit, as decimal text).
#define MR_EXPORT_APP_SUM_U64(map, reduce, combine)                                                \
    const mr_app mr_the_app = {(map), (reduce), (combine), MR_COMBINE_SUM_U64, {NULL, NULL, NULL}}

/// Exports an app whose reduce is a fold (see mr_fold): `start`, `add` and
/// `finish` in place of a reduce function. `combine` may be NULL.
#define MR_EXPORT_APP_FOLD(map, start, add, finish, combine)                                       \
    const mr_app mr_the_app = {(map), NULL, (combine), MR_COMBINE_TEXT, {(start), (add), (finish)}}

/// Emits one intermediate pair (copied; call it from map only).
void mr_emit(mr_str key, mr_str value);

/// Emits one intermediate pair whose value is the count `n` (for apps
/// exported with MR_EXPORT_APP_SUM_U64: nothing is printed or parsed; for
/// others, the same as mr_emit with `n` in decimal).
void mr_emit_u64(mr_str key, uint64_t n);

/// Tells the host that the map is `done` (bytes, lines, any unit) of
/// `total` through its input; for apps whose keys and values do not point
/// into the contents, or come out of input order (mr_emit sees keys that
/// point into it by itself). The first call turns the SDK's own reports
/// off for the rest of the map. A few hundred calls per map are plenty;
/// the host never moves progress back.
void mr_progress(uint64_t done, uint64_t total);

/// Adds `delta` to the app's counter `name` (Hadoop's user counters): the
/// job's report sums each counter over the attempts whose output was
/// committed, one per task, so a retried or killed attempt's counts are
/// not added twice. Works in map, reduce and combine. A name is 1 to 64
/// bytes of printable text, and an attempt may use at most 32 names
/// (beyond either, the task fails saying so).
void mr_counter(mr_str name, int64_t delta);

/// Splits text into words the way the MIT 6.5840 lab does (Go's
/// unicode.IsLetter): maximal runs of Unicode letters (general category L),
/// case kept. Finds the next word in `*text`, stores it in `*word`, moves
/// `*text` past it and returns true; returns false when no word is left.
bool mr_next_word(mr_str *text, mr_str *word);

/// Whether the code point `c` is a letter (general category L), by the Rust
/// SDK's table.
bool mr_is_letter(uint32_t c);

/// Fails the task with a printf-style message (printed to stderr, which the
/// host quotes in the failure). Does not return.
_Noreturn void mr_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// ---- The SDK's internals, shared with mr_component.c and the tests. ----

/// Hands a batch of records (mr:app@0.2.0's encoding: varint key length,
/// varint value length, key, value) to the host (mr_component.c: the
/// `emit` import).
void mr__host_emit(const uint8_t *records, size_t len);

/// Tells the host how far the map is (mr_component.c: the `progress`
/// import).
void mr__host_progress(uint64_t done, uint64_t total);

/// Adds to one of the app's counters (mr_component.c: the `counter`
/// import).
void mr__host_counter(mr_str name, int64_t delta);

/// Starts a map task's emitter (with the app's combiner, or NULL, and what
/// it does) for a map of `contents`.
void mr__emitter_start(mr_combine_fn combine, mr_combiner kind, mr_str contents);

/// Hands everything the emitter still holds to the host.
void mr__emitter_finish(void);

/// One group of the host's: a key and some of its values.
typedef struct {
    mr_str key;
    const mr_str *values;
    size_t n;
    bool last;
} mr_group;

/// Gathers groups into whole keys and calls `f` once per whole key, writing
/// its results to `out` (one per group with `last`); `pending` keeps a key
/// whose values are still arriving between calls (index 0: reduce,
/// 1: combine; a combine key's values are folded with `f` whenever a group
/// of it is not its last). With `fold` (not NULL), each key's values go to
/// a fold's state as they come instead, and `f` is not called. Returns
/// NULL, or a message on a protocol error.
const char *mr__gather(int pending, const mr_group *groups, size_t n, mr_reduce_fn f,
                       const mr_fold *fold, mr_string *out, size_t *n_out);

/// Decodes a batch of groups (mr:app@0.2.0: flags, varint key length, key,
/// varint value count, then varint length and bytes of each value) into
/// `*groups` and `*values` (malloc'd, pointing into `bytes`). Returns NULL,
/// or a message if the batch is malformed (then nothing is allocated).
const char *mr__decode_groups(const uint8_t *bytes, size_t len, mr_group **groups, size_t *n,
                              mr_str **values);

/// Encodes `k` values (varint length, bytes each) into a malloc'd buffer
/// of `*len` bytes.
uint8_t *mr__encode_values(const mr_string *out, size_t k, size_t *len);

#ifdef __cplusplus
}
#endif

#endif // MR_H
