// The C SDK's core (see mr.h): strings, words, the batching and combining
// emitter, and gathering a key's groups. Portable C11: it knows nothing of
// the component bindings (mr_component.c does), so its tests build natively.

#include "mr.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mr_letters.h"

// Words, keys and hashes are read eight bytes at a time as little-endian
// numbers, as wasm32 is (this guards the SDK's native unit tests).
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the C SDK assumes a little-endian target (wasm32 is)"
#endif

// Pairs and bytes buffered before one `emit` call hands them to the host
// (one boundary crossing is costly; a batch stays well under the host's
// limit on one call).
#define BATCH_PAIRS 8192
#define BATCH_BYTES (1u << 20)
// Values of one key collected before the combiner folds them into one.
#define COMBINE_AT 8
// Bytes (estimated, allocator overhead included) held in the combining table
// before it is flushed to the host: bounds guest memory for apps with huge
// vocabularies.
#define TABLE_BYTES (48u << 20)
// Estimated bytes a table entry costs beyond its text.
#define ENTRY_OVERHEAD 96
// Pairs emitted between two looks at how far into its input a map is, and
// progress reports per map, at most (at least 64 KiB apart).
#define PROGRESS_EVERY 4096
#define PROGRESS_STEPS 256

_Noreturn void mr_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    abort();
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q)
        mr_fail("mr: out of memory (asked for %zu bytes)", n);
    return q;
}

mr_str mr_str_c(const char *s) { return (mr_str){s, strlen(s)}; }

bool mr_str_eq(mr_str a, mr_str b) {
    return a.len == b.len && (a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0);
}

mr_string mr_string_copy(mr_str s) {
    char *p = xrealloc(NULL, s.len);
    if (s.len)
        memcpy(p, s.ptr, s.len);
    return (mr_string){p, s.len};
}

mr_string mr_string_u64(uint64_t n) {
    char digits[20];
    size_t i = sizeof digits;
    do {
        digits[--i] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    return mr_string_copy((mr_str){digits + i, sizeof digits - i});
}

uint64_t mr_parse_u64(mr_str s) {
    if (s.len == 0)
        mr_fail("mr_parse_u64: an empty string is not a number");
    uint64_t n = 0;
    for (size_t i = 0; i < s.len; i++) {
        unsigned d = (unsigned char)s.ptr[i] - '0';
        if (d > 9)
            mr_fail("mr_parse_u64: \"%.*s\" is not a decimal number", (int)s.len, s.ptr);
        if (n > (UINT64_MAX - d) / 10)
            mr_fail("mr_parse_u64: \"%.*s\" does not fit in 64 bits", (int)s.len, s.ptr);
        n = n * 10 + d;
    }
    return n;
}

// ---- Words ----

bool mr_is_letter(uint32_t c) {
    if (c < 0x80)
        return (c | 0x20) - 'a' < 26;
    size_t lo = 0, hi = sizeof mr_letter_ranges / sizeof mr_letter_ranges[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < mr_letter_ranges[mid][0])
            hi = mid;
        else if (c > mr_letter_ranges[mid][1])
            lo = mid + 1;
        else
            return true;
    }
    return false;
}

// Decodes the code point at *p (< end) and moves *p past it. Input from the
// host is valid UTF-8; anything else decodes as U+FFFD (not a letter), one
// byte at a time.
static uint32_t decode(const unsigned char **p, const unsigned char *end) {
    const unsigned char *s = *p;
    unsigned b = s[0];
    uint32_t c;
    size_t n;
    if (b < 0x80) {
        *p = s + 1;
        return b;
    } else if (b >= 0xC2 && b < 0xE0) {
        n = 2, c = b & 0x1F;
    } else if (b >= 0xE0 && b < 0xF0) {
        n = 3, c = b & 0x0F;
    } else if (b >= 0xF0 && b < 0xF5) {
        n = 4, c = b & 0x07;
    } else {
        *p = s + 1;
        return 0xFFFD;
    }
    if ((size_t)(end - s) < n) {
        *p = s + 1;
        return 0xFFFD;
    }
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            *p = s + 1;
            return 0xFFFD;
        }
        c = (c << 6) | (s[i] & 0x3F);
    }
    *p = s + n;
    return c;
}

static inline bool ascii_letter(unsigned b) { return (b | 0x20) - 'a' < 26; }

// The top bit of every byte.
#define HIGH 0x8080808080808080ull

// Of the eight bytes in `x` (little-endian): the top bit of each that is an
// ASCII letter, among the leading ASCII ones; and in *ascii how many lead
// that are ASCII (8 if all are; at a byte that is not, a letter could
// start, and the caller decodes it). The Rust SDK's `words` scans the same
// way: a byte per loop turn cost wc-c 1.7x the Rust app's tokenizing time.
static inline uint64_t ascii_letters(uint64_t x, unsigned *ascii) {
    uint64_t high = x & HIGH;
    unsigned a = high ? (unsigned)__builtin_ctzll(high) / 8 : 8;
    // Per byte v < 0x80: v | 0x20 folds case; + 0x1f sets the top bit for
    // v >= 'a', + 0x05 for v > 'z' (no byte below the first non-ASCII one
    // carries into the next).
    uint64_t lower = x | 0x2020202020202020ull;
    uint64_t ge_a = lower + 0x1f1f1f1f1f1f1f1full;
    uint64_t gt_z = lower + 0x0505050505050505ull;
    uint64_t keep = a == 8 ? HIGH : (((uint64_t)1 << (a * 8)) - 1) & HIGH;
    *ascii = a;
    return ge_a & ~gt_z & keep;
}

// Whether a letter starts at p (< end); its length in *len.
static inline bool letter_at(const unsigned char *p, const unsigned char *end, size_t *len) {
    if (*p < 0x80) {
        *len = 1;
        return ascii_letter(*p);
    }
    const unsigned char *q = p;
    bool letter = mr_is_letter(decode(&q, end));
    *len = (size_t)(q - p);
    return letter;
}

bool mr_next_word(mr_str *text, mr_str *word) {
    const unsigned char *p = (const unsigned char *)text->ptr;
    const unsigned char *end = p + text->len;
    size_t len;
    // Skip to the next letter: eight ASCII bytes at a time while none is
    // one.
    for (;;) {
        if (end - p >= 8) {
            uint64_t x;
            memcpy(&x, p, 8);
            unsigned ascii;
            uint64_t letters = ascii_letters(x, &ascii);
            if (letters) {
                p += __builtin_ctzll(letters) / 8;
                break;
            }
            p += ascii;
            if (ascii == 8)
                continue;
        }
        if (p >= end) {
            *text = (mr_str){(const char *)end, 0};
            return false;
        }
        if (letter_at(p, end, &len))
            break;
        p += len;
    }
    const unsigned char *start = p;
    // Take letters, eight ASCII ones at a time.
    while (p < end) {
        if (end - p >= 8) {
            uint64_t x;
            memcpy(&x, p, 8);
            unsigned ascii;
            uint64_t others = ~ascii_letters(x, &ascii) & HIGH;
            // The first of the eight that is not an ASCII letter: an ASCII
            // non-letter ends the word; a non-ASCII byte is looked at below.
            unsigned first = others ? (unsigned)__builtin_ctzll(others) / 8 : 8;
            p += first;
            if (first == 8)
                continue;
            if (first < ascii)
                break;
        }
        if (!letter_at(p, end, &len))
            break;
        p += len;
    }
    *word = (mr_str){(const char *)start, (size_t)(p - start)};
    *text = (mr_str){(const char *)p, (size_t)(end - p)};
    return true;
}

// ---- The emitter: a batch of records, and the combining tables ----

// Appends `v` as a varint (unsigned LEB128, as mr:app@0.2.0 writes
// lengths); returns the bytes written (at most 5).
static size_t put_varint(uint8_t *p, uint32_t v) {
    size_t i = 0;
    while (v >= 0x80) {
        p[i++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[i++] = (uint8_t)v;
    return i;
}

// Copies the first and the last `w` bytes of `n` (w <= n <= 2w): two
// copies of a fixed size, which the compiler makes a load and a store each.
static inline void copy_ends(char *dst, const char *src, size_t n, size_t w) {
    char a[8], b[8];
    memcpy(a, src, w);
    memcpy(b, src + n - w, w);
    memcpy(dst, a, w);
    memcpy(dst + n - w, b, w);
}

// Copies `n` bytes: up to 16 with fixed-size loads and stores (two that
// overlap, or three single bytes), more with memcpy. wasi-libc's memcpy
// is a call that copies short unaligned strings a byte per loop turn (with
// the sandbox's interruption check at each); the keys and counts this SDK
// copies are mostly a few bytes long (5.4 % of wc-c's profile went there).
static inline void copy_bytes(char *dst, const char *src, size_t n) {
    if (n > 16) {
        memcpy(dst, src, n);
    } else if (n >= 8) {
        copy_ends(dst, src, n, 8);
    } else if (n >= 4) {
        copy_ends(dst, src, n, 4);
    } else if (n) {
        char a = src[0], b = src[n / 2], c = src[n - 1];
        dst[0] = a;
        dst[n / 2] = b;
        dst[n - 1] = c;
    }
}

// Records (varint key length, varint value length, key, value) waiting
// for one `emit` call.
static struct {
    uint8_t *bytes;
    size_t len, cap, n;
} batch;

static void flush_batch(void) {
    if (!batch.n)
        return;
    mr__host_emit(batch.bytes, batch.len);
    batch.n = 0;
    batch.len = 0;
}

// The host takes at most this many bytes in one `emit` call.
#define MAX_RECORD (16u << 20)

static void push(mr_str key, mr_str value) {
    if (key.len > MAX_RECORD || value.len > MAX_RECORD - key.len)
        mr_fail("mr_emit: a pair of %zu + %zu bytes is more than the host takes in one batch "
                "(16 MiB)",
                key.len, value.len);
    size_t need = 10 + key.len + value.len;
    if (batch.len + need > batch.cap) {
        size_t cap = batch.cap ? batch.cap : BATCH_BYTES + (64 << 10);
        while (cap < batch.len + need)
            cap *= 2;
        batch.bytes = xrealloc(batch.bytes, cap);
        batch.cap = cap;
    }
    uint8_t *p = batch.bytes + batch.len;
    p += put_varint(p, (uint32_t)key.len);
    p += put_varint(p, (uint32_t)value.len);
    copy_bytes((char *)p, key.ptr, key.len);
    p += key.len;
    copy_bytes((char *)p, value.ptr, value.len);
    p += value.len;
    batch.len = (size_t)(p - batch.bytes);
    if (++batch.n == BATCH_PAIRS || batch.len >= BATCH_BYTES)
        flush_batch();
}

// The `n` bytes at `p` (at most eight) as a little-endian integer,
// zero-padded: the same as memcpy into a zeroed word, but with fixed-size
// loads only. A memcpy of a variable length is a call into wasi-libc,
// whose loop copies a byte per turn (with the sandbox's interruption check
// at each): two such calls per emitted word took 10.6 % of wc-c's profile
// (1 GiB, 2026-12-07). Four to seven bytes are two overlapping loads,
// fewer are three bytes, in equal bytes where they overlap.
static inline uint64_t load_le(const char *p, size_t n) {
    uint64_t w = 0;
    if (n >= 8) {
        memcpy(&w, p, 8);
    } else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + n - 4, 4);
        w = (uint64_t)a | (uint64_t)b << (8 * (n - 4));
    } else if (n) {
        w = (uint64_t)(unsigned char)p[0] | (uint64_t)(unsigned char)p[n / 2] << (8 * (n / 2)) |
            (uint64_t)(unsigned char)p[n - 1] << (8 * (n - 1));
    }
    return w;
}

// The first eight bytes of `s`, zero-padded (a key of at most eight bytes
// is compared by this and its length alone).
static inline uint64_t head_of(const char *p, size_t len) { return load_le(p, len < 8 ? len : 8); }

// A fast hash of a key: eight bytes at a time, multiplied and mixed.
static inline uint64_t hash64(const char *p, size_t len) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ len;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 29;
    }
    if (i < len)
        h = (h ^ load_le(p + i, len - i)) * 0x94D049BB133111EBull;
    h ^= h >> 32;
    return h * 0xD6E8FEB86659FD93ull;
}

// Whether `a` and `b`, `len` (> 8) bytes each and equal in their first
// eight, are equal: up to 16 bytes by one load of their last eight each.
static inline bool same_tail(const char *a, const char *b, size_t len) {
    if (len <= 16)
        return load_le(a + len - 8, 8) == load_le(b + len - 8, 8);
    return memcmp(a + 8, b + 8, len - 8) == 0;
}

// Counts per key for MR_COMBINE_SUM_U64: keys packed in one arena, a small
// entry per key in an open-addressing table (no allocation per key or
// value; a flush keeps the memory for the next). As in the Rust SDK's
// table (hashbrown), a byte per slot says whether it is taken and holds 7
// bits of its key's hash: a probe reads the 32-byte entry only when that
// byte matches, a new key's probe reads none, and only the bytes are
// cleared (an empty table of 64K slots: 64 KiB to clear, not 2 MiB).
typedef struct {
    uint64_t hash, head, sum;
    uint32_t at, len;
} sum_entry;

static struct {
    bool on;
    uint8_t *ctrl; // per slot: 0 if empty, else 0x80 | the hash's top 7 bits
    sum_entry *slots;
    size_t cap, count;
    char *arena;
    size_t arena_len, arena_cap;
} sums;

static inline uint8_t tag_of(uint64_t hash) { return (uint8_t)(0x80 | (hash >> 57)); }

static void sums_grow(size_t cap) {
    uint8_t *ctrl = xrealloc(NULL, cap);
    memset(ctrl, 0, cap);
    sum_entry *slots = xrealloc(NULL, cap * sizeof(sum_entry));
    for (size_t i = 0; i < sums.cap; i++) {
        if (!sums.ctrl[i])
            continue;
        size_t j = sums.slots[i].hash & (cap - 1);
        while (ctrl[j])
            j = (j + 1) & (cap - 1);
        ctrl[j] = sums.ctrl[i];
        slots[j] = sums.slots[i];
    }
    free(sums.ctrl);
    free(sums.slots);
    sums.ctrl = ctrl;
    sums.slots = slots;
    sums.cap = cap;
}

// Sizes the table for a map over `len` bytes of text (about a distinct word
// per 32 bytes at most: 2 MiB of the benchmark's text has 56,572), so it
// rarely grows: growing rehashes everything. A slot costs a byte to clear;
// only the entries used are touched.
static void sums_start(size_t len) {
    size_t want = len / 32;
    want = want < 1024 ? 1024 : want > (1u << 18) ? (1u << 18) : want;
    size_t cap = 1;
    while (cap * 3 < want * 4)
        cap *= 2;
    if (sums.cap < cap)
        sums_grow(cap);
    if (!sums.arena) {
        // Never NULL once on: keys (even empty ones) are placed at
        // `arena + arena_len`, and NULL + 0 is undefined in C.
        sums.arena_cap = 1 << 20;
        sums.arena = xrealloc(NULL, sums.arena_cap);
    }
    sums.on = true;
}

static void sums_flush(void) {
    char digits[20];
    for (size_t i = 0; i < sums.cap && sums.count; i++) {
        if (!sums.ctrl[i])
            continue;
        sum_entry *e = &sums.slots[i];
        uint64_t n = e->sum;
        size_t d = sizeof digits;
        do {
            digits[--d] = (char)('0' + n % 10);
            n /= 10;
        } while (n);
        push((mr_str){sums.arena + e->at, e->len}, (mr_str){digits + d, sizeof digits - d});
        sums.ctrl[i] = 0;
        sums.count--;
    }
    sums.count = 0;
    sums.arena_len = 0;
}

// Estimated bytes the sums hold (the arena, and the table).
static size_t sums_bytes(void) {
    return sums.arena_len + sums.cap * (sizeof(sum_entry) + 1);
}

// Adds `n` to `key`'s sum; false if that would pass UINT64_MAX (the caller
// emits the pair as it is instead).
static bool sums_add(mr_str key, uint64_t n) {
    if (key.len >= UINT32_MAX / 4)
        return false;
    if ((sums.count + 1) * 4 > sums.cap * 3) {
        // A table that would outgrow the budget is flushed instead.
        if (sums.cap * 2 * (sizeof(sum_entry) + 1) + sums.arena_len >= TABLE_BYTES)
            sums_flush();
        else
            sums_grow(sums.cap * 2);
    }
    uint64_t h = hash64(key.ptr, key.len), head = head_of(key.ptr, key.len);
    uint8_t tag = tag_of(h);
    uint32_t len = (uint32_t)key.len;
    size_t j = h & (sums.cap - 1);
    for (;;) {
        uint8_t c = sums.ctrl[j];
        if (!c)
            break;
        sum_entry *e = &sums.slots[j];
        if (c == tag && e->hash == h && e->head == head && e->len == len &&
            (key.len <= 8 || same_tail(sums.arena + e->at, key.ptr, key.len))) {
            if (e->sum > UINT64_MAX - n)
                return false;
            e->sum += n;
            return true;
        }
        j = (j + 1) & (sums.cap - 1);
    }
    if (sums.arena_len + key.len > UINT32_MAX / 2)
        return false;
    if (sums.arena_len + key.len > sums.arena_cap) {
        size_t cap = sums.arena_cap;
        while (cap < sums.arena_len + key.len)
            cap *= 2;
        sums.arena = xrealloc(sums.arena, cap);
        sums.arena_cap = cap;
    }
    copy_bytes(sums.arena + sums.arena_len, key.ptr, key.len);
    sums.ctrl[j] = tag;
    sums.slots[j] = (sum_entry){h, head, n, (uint32_t)sums.arena_len, len};
    sums.arena_len += key.len;
    sums.count++;
    return true;
}

// Parses a decimal count quickly ("1" most of all); false if `v` is not one.
static bool count_of(mr_str v, uint64_t *n) {
    if (v.len == 1 && (unsigned char)v.ptr[0] - '0' < 10) {
        *n = (unsigned char)v.ptr[0] - '0';
        return true;
    }
    if (v.len == 0 || v.len > 20)
        return false;
    uint64_t t = 0;
    for (size_t i = 0; i < v.len; i++) {
        unsigned d = (unsigned char)v.ptr[i] - '0';
        if (d > 9 || t > (UINT64_MAX - d) / 10)
            return false;
        t = t * 10 + d;
    }
    *n = t;
    return true;
}

// One key's values waiting to be combined, packed in one buffer.
typedef struct {
    char *key;
    char *vals;
    uint32_t klen, hash, vlen, vcap;
    uint32_t ends[COMBINE_AT];
    uint32_t used; // values held; 0: an empty slot
} entry;

static struct {
    mr_combine_fn combine;
    entry *slots;
    size_t cap, count, bytes;
} table;

static uint32_t hash(mr_str s) {
    uint32_t h = 2166136261u; // FNV-1a
    for (size_t i = 0; i < s.len; i++)
        h = (h ^ (unsigned char)s.ptr[i]) * 16777619u;
    return h;
}

static size_t values_of(const entry *e, mr_str *out) {
    uint32_t start = 0;
    for (uint32_t i = 0; i < e->used; i++) {
        out[i] = (mr_str){e->vals + start, e->ends[i] - start};
        start = e->ends[i];
    }
    return e->used;
}

static void grow_table(void) {
    size_t cap = table.cap ? table.cap * 2 : 4096;
    entry *slots = xrealloc(NULL, cap * sizeof(entry));
    memset(slots, 0, cap * sizeof(entry));
    for (size_t i = 0; i < table.cap; i++) {
        entry *e = &table.slots[i];
        if (!e->used)
            continue;
        size_t j = e->hash & (cap - 1);
        while (slots[j].used)
            j = (j + 1) & (cap - 1);
        slots[j] = *e;
    }
    free(table.slots);
    table.slots = slots;
    table.cap = cap;
}

static void flush_table(void) {
    mr_str values[COMBINE_AT];
    for (size_t i = 0; i < table.cap; i++) {
        entry *e = &table.slots[i];
        if (!e->used)
            continue;
        mr_str key = {e->key, e->klen};
        size_t n = values_of(e, values);
        if (n > 1) {
            mr_string c = table.combine(key, values, n);
            push(key, (mr_str){c.ptr, c.len});
            free(c.ptr);
        } else {
            push(key, values[0]);
        }
        free(e->key);
        free(e->vals);
        e->used = 0;
    }
    table.count = 0;
    table.bytes = 0;
}

static void add_value(entry *e, mr_str value) {
    if (e->vlen + value.len > e->vcap) {
        uint32_t cap = e->vcap ? e->vcap * 2 : 8;
        while (cap < e->vlen + value.len)
            cap *= 2;
        e->vals = xrealloc(e->vals, cap);
        e->vcap = cap;
    }
    if (value.len)
        memcpy(e->vals + e->vlen, value.ptr, value.len);
    e->vlen += (uint32_t)value.len;
    e->ends[e->used++] = e->vlen;
}

// Where the map is: its contents, and when to look and report next.
static struct {
    uintptr_t base;
    size_t len, next_report;
    uint32_t countdown;
} where;

void mr__emitter_start(mr_combine_fn combine, mr_combiner kind, mr_str contents) {
    table.combine = combine;
    batch.n = 0;
    batch.len = 0;
    sums.on = false;
    if (combine && kind == MR_COMBINE_SUM_U64)
        sums_start(contents.len);
    where.base = (uintptr_t)contents.ptr;
    where.len = contents.len;
    where.next_report = 0;
    where.countdown = PROGRESS_EVERY;
}

void mr_progress(uint64_t done, uint64_t total) {
    // No pointer lies in empty contents: look reports nothing more.
    where.len = 0;
    mr__host_progress(done, total);
}

void mr_counter(mr_str name, int64_t delta) { mr__host_counter(name, delta); }

// Whether `s` starts inside the contents; its offset in `*at`.
static bool offset_of(mr_str s, size_t *at) {
    uintptr_t p = (uintptr_t)s.ptr;
    if (p < where.base || p - where.base >= where.len)
        return false;
    *at = p - where.base;
    return true;
}

static void look(mr_str key, mr_str value) {
    where.countdown = PROGRESS_EVERY;
    size_t at;
    if (!offset_of(key, &at) && !offset_of(value, &at))
        return;
    if (at >= where.next_report) {
        size_t step = where.len / PROGRESS_STEPS;
        where.next_report = at + (step > (64 << 10) ? step : (64 << 10));
        mr__host_progress(at, where.len);
    }
}

// Adds a count to the sums (flushing them when full); false if it cannot
// be added there.
static bool add_count(mr_str key, uint64_t n) {
    if (!sums_add(key, n))
        return false;
    if (sums_bytes() >= TABLE_BYTES)
        sums_flush();
    return true;
}

void mr_emit_u64(mr_str key, uint64_t n) {
    if (!sums.on) {
        mr_string v = mr_string_u64(n);
        mr_emit(key, (mr_str){v.ptr, v.len});
        free(v.ptr);
        return;
    }
    if (--where.countdown == 0)
        look(key, MR_STR(""));
    if (!add_count(key, n)) {
        mr_string v = mr_string_u64(n);
        push(key, (mr_str){v.ptr, v.len});
        free(v.ptr);
    }
}

void mr_emit(mr_str key, mr_str value) {
    if (--where.countdown == 0)
        look(key, value);
    if (sums.on) {
        uint64_t n;
        // Not a count (or a sum past UINT64_MAX): as it is.
        if (!count_of(value, &n) || !add_count(key, n))
            push(key, value);
        return;
    }
    if (!table.combine) {
        push(key, value);
        return;
    }
    if ((table.count + 1) * 4 > table.cap * 3)
        grow_table();
    uint32_t h = hash(key);
    size_t j = h & (table.cap - 1);
    entry *e;
    for (;;) {
        e = &table.slots[j];
        if (!e->used) {
            if (key.len > UINT32_MAX / 2 || value.len > UINT32_MAX / 2)
                mr_fail("mr_emit: a key or value of %zu bytes is too long to combine",
                        key.len > value.len ? key.len : value.len);
            mr_string k = mr_string_copy(key);
            *e = (entry){.key = k.ptr, .klen = (uint32_t)key.len, .hash = h};
            add_value(e, value);
            table.count++;
            table.bytes += key.len + value.len + ENTRY_OVERHEAD;
            if (table.bytes >= TABLE_BYTES)
                flush_table();
            return;
        }
        if (e->hash == h && e->klen == key.len && memcmp(e->key, key.ptr, key.len) == 0)
            break;
        j = (j + 1) & (table.cap - 1);
    }
    if (value.len > UINT32_MAX / 2 - e->vlen)
        mr_fail("mr_emit: too many bytes of values to combine for one key");
    add_value(e, value);
    table.bytes += value.len;
    if (e->used == COMBINE_AT) {
        mr_str values[COMBINE_AT];
        size_t n = values_of(e, values);
        mr_string c = table.combine((mr_str){e->key, e->klen}, values, n);
        if (c.len > UINT32_MAX / 2)
            mr_fail("combine returned a value of %zu bytes, too long to combine", c.len);
        table.bytes = table.bytes - e->vlen + c.len;
        free(e->vals);
        e->vals = c.ptr;
        e->vcap = e->vlen = (uint32_t)c.len;
        e->ends[0] = e->vlen;
        e->used = 1;
    }
    if (table.bytes >= TABLE_BYTES)
        flush_table();
}

void mr__emitter_finish(void) {
    if (sums.on)
        sums_flush();
    else if (table.combine)
        flush_table();
    flush_batch();
}

// ---- Gathering a key's groups ----

// A key's values gathered from its groups so far, packed: their bytes one
// after another and where each ends (4 bytes a value, not a malloc each),
// so a key with tens of millions of values fits in a guest's memory.
static struct {
    bool active;
    mr_string key;
    // A fold's state, if the key's values go to a fold (mr_fold).
    void *state;
    char *bytes;
    size_t len, cap;
    uint32_t *ends;
    size_t n, ncap;
} pending[2];

static void keep(int which, mr_str v) {
    if (pending[which].len + v.len > pending[which].cap) {
        size_t cap = pending[which].cap ? pending[which].cap * 2 : 256;
        while (cap < pending[which].len + v.len)
            cap *= 2;
        pending[which].bytes = xrealloc(pending[which].bytes, cap);
        pending[which].cap = cap;
    }
    if (pending[which].n == pending[which].ncap) {
        pending[which].ncap = pending[which].ncap ? pending[which].ncap * 2 : 64;
        pending[which].ends =
            xrealloc(pending[which].ends, pending[which].ncap * sizeof(uint32_t));
    }
    if (v.len)
        memcpy(pending[which].bytes + pending[which].len, v.ptr, v.len);
    pending[which].len += v.len;
    pending[which].ends[pending[which].n++] = (uint32_t)pending[which].len;
}

// The values gathered so far, borrowed (one array, freed by the caller).
static mr_str *gathered(int which) {
    size_t total = pending[which].n, start = 0;
    mr_str *all = xrealloc(NULL, (total ? total : 1) * sizeof(mr_str));
    for (size_t j = 0; j < total; j++) {
        all[j] = (mr_str){pending[which].bytes + start, pending[which].ends[j] - start};
        start = pending[which].ends[j];
    }
    return all;
}

static void drop_pending(int which, const mr_fold *f) {
    if (pending[which].state && f) {
        // The fold frees its state with its result.
        free(f->finish(pending[which].state).ptr);
    }
    free(pending[which].bytes);
    free(pending[which].ends);
    free(pending[which].key.ptr);
    memset(&pending[which], 0, sizeof pending[which]);
}

// A combiner may run on any subset of a key's values: folds a combine key's
// values gathered so far into one, so a long run does not pile up here.
static void fold_gathered(int which, mr_reduce_fn f) {
    if (which != 1 || pending[which].n < 2)
        return;
    mr_str *all = gathered(which);
    mr_string folded =
        f((mr_str){pending[which].key.ptr, pending[which].key.len}, all, pending[which].n);
    free(all);
    pending[which].len = 0;
    pending[which].n = 0;
    keep(which, (mr_str){folded.ptr, folded.len});
    free(folded.ptr);
}

const char *mr__gather(int which, const mr_group *groups, size_t n, mr_reduce_fn f,
                       const mr_fold *fold, mr_string *out, size_t *n_out) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const mr_group *g = &groups[i];
        if (pending[which].active) {
            mr_str pkey = {pending[which].key.ptr, pending[which].key.len};
            if (!mr_str_eq(pkey, g->key)) {
                drop_pending(which, fold);
                *n_out = k;
                return "host protocol error: a key ended without its last group";
            }
        }
        if (fold) {
            void *state = pending[which].active ? pending[which].state : fold->start(g->key);
            for (size_t j = 0; j < g->n; j++)
                fold->add(state, g->values[j]);
            if (g->last) {
                out[k++] = fold->finish(state);
                pending[which].state = NULL;
                if (pending[which].active)
                    drop_pending(which, fold);
            } else if (!pending[which].active) {
                pending[which].active = true;
                pending[which].key = mr_string_copy(g->key);
                pending[which].state = state;
            }
            continue;
        }
        if (pending[which].active) {
            for (size_t j = 0; j < g->n; j++)
                keep(which, g->values[j]);
            if (!g->last) {
                fold_gathered(which, f);
                continue;
            }
            mr_str *all = gathered(which);
            out[k++] = f(g->key, all, pending[which].n);
            free(all);
            drop_pending(which, fold);
        } else if (g->last) {
            out[k++] = f(g->key, g->values, g->n);
        } else {
            pending[which].active = true;
            pending[which].key = mr_string_copy(g->key);
            for (size_t j = 0; j < g->n; j++)
                keep(which, g->values[j]);
            fold_gathered(which, f);
        }
    }
    *n_out = k;
    return NULL;
}

// ---- The contract's encodings (mr:app@0.2.0) ----

// Reads a varint at *p (< end) into *v, moving *p past it.
static bool get_varint(const uint8_t **p, const uint8_t *end, uint32_t *v) {
    uint32_t x = 0;
    for (int i = 0; i < 5; i++) {
        if (*p >= end)
            return false;
        uint8_t b = *(*p)++;
        if (i == 4 && b > 0x0f)
            return false; // more than 32 bits
        x |= (uint32_t)(b & 0x7f) << (7 * i);
        if (b < 0x80) {
            *v = x;
            return true;
        }
    }
    return false;
}

const char *mr__decode_groups(const uint8_t *bytes, size_t len, mr_group **groups, size_t *n,
                              mr_str **values) {
    const uint8_t *p = bytes, *end = bytes + len;
    size_t ng = 0, cg = 0, nv = 0, cv = 0;
    mr_group *gs = NULL;
    mr_str *vs = NULL;
    const char *err = NULL;
    while (p < end) {
        uint8_t flags = *p++;
        uint32_t klen, count;
        if (flags > 1) {
            err = "host protocol error: a group's flags are not 0 or 1";
            break;
        }
        if (!get_varint(&p, end, &klen) || klen > (size_t)(end - p)) {
            err = "host protocol error: a key runs past the end of the batch";
            break;
        }
        mr_str key = {(const char *)p, klen};
        p += klen;
        if (!get_varint(&p, end, &count) || count > (size_t)(end - p)) {
            err = "host protocol error: a group's value count runs past the end of the batch";
            break;
        }
        if (ng == cg) {
            cg = cg ? cg * 2 : 64;
            gs = xrealloc(gs, cg * sizeof(mr_group));
        }
        // The group's values: indices into `vs` until it stops moving.
        gs[ng++] = (mr_group){key, (const mr_str *)(uintptr_t)nv, count, flags == 1};
        for (uint32_t i = 0; i < count; i++) {
            uint32_t vlen;
            if (!get_varint(&p, end, &vlen) || vlen > (size_t)(end - p)) {
                err = "host protocol error: a value runs past the end of the batch";
                break;
            }
            if (nv == cv) {
                cv = cv ? cv * 2 : 256;
                vs = xrealloc(vs, cv * sizeof(mr_str));
            }
            vs[nv++] = (mr_str){(const char *)p, vlen};
            p += vlen;
        }
        if (err)
            break;
    }
    if (err) {
        free(gs);
        free(vs);
        *groups = NULL;
        *values = NULL;
        *n = 0;
        return err;
    }
    for (size_t i = 0; i < ng; i++)
        gs[i].values = vs ? vs + (uintptr_t)gs[i].values : NULL;
    *groups = gs;
    *values = vs;
    *n = ng;
    return NULL;
}

uint8_t *mr__encode_values(const mr_string *out, size_t k, size_t *len) {
    size_t total = 0;
    for (size_t i = 0; i < k; i++) {
        if (out[i].len > UINT32_MAX)
            mr_fail("mr: a value of more than 4 GiB");
        total += 5 + out[i].len;
    }
    uint8_t *bytes = xrealloc(NULL, total), *p = bytes;
    for (size_t i = 0; i < k; i++) {
        p += put_varint(p, (uint32_t)out[i].len);
        if (out[i].len)
            memcpy(p, out[i].ptr, out[i].len);
        p += out[i].len;
    }
    *len = (size_t)(p - bytes);
    return bytes;
}
