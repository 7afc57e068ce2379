// The C SDK's core (see mr.h): strings, words, the batching and combining
// emitter, and gathering a key's groups. Portable C11: it knows nothing of
// the component bindings (mr_component.c does), so its tests build natively.

#include "mr.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mr_letters.h"

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

bool mr_next_word(mr_str *text, mr_str *word) {
    const unsigned char *p = (const unsigned char *)text->ptr;
    const unsigned char *end = p + text->len;
    const unsigned char *start = NULL;
    while (p < end) {
        if (*p < 0x80) {
            if (ascii_letter(*p)) {
                start = p++;
                break;
            }
            p++;
            continue;
        }
        const unsigned char *q = p;
        if (mr_is_letter(decode(&q, end))) {
            start = p;
            p = q;
            break;
        }
        p = q;
    }
    if (!start) {
        *text = (mr_str){(const char *)end, 0};
        return false;
    }
    while (p < end) {
        if (*p < 0x80) {
            if (!ascii_letter(*p))
                break;
            p++;
            continue;
        }
        const unsigned char *q = p;
        if (!mr_is_letter(decode(&q, end)))
            break;
        p = q;
    }
    *word = (mr_str){(const char *)start, (size_t)(p - start)};
    *text = (mr_str){(const char *)p, (size_t)(end - p)};
    return true;
}

// ---- The emitter: a batch of pairs, and the combining table ----

// Pairs whose bytes live in `bytes`; their pointers hold offsets into it
// until the batch is handed over (the buffer may move as it grows).
static struct {
    mr_kv pairs[BATCH_PAIRS];
    size_t n;
    char *bytes;
    size_t len, cap;
} batch;

static void flush_batch(void) {
    if (!batch.n)
        return;
    for (size_t i = 0; i < batch.n; i++) {
        batch.pairs[i].key.ptr = batch.bytes + (uintptr_t)batch.pairs[i].key.ptr;
        batch.pairs[i].value.ptr = batch.bytes + (uintptr_t)batch.pairs[i].value.ptr;
    }
    mr__host_emit(batch.pairs, batch.n);
    batch.n = 0;
    batch.len = 0;
}

static size_t append(mr_str s) {
    if (batch.len + s.len > batch.cap) {
        size_t cap = batch.cap ? batch.cap : 64 << 10;
        while (cap < batch.len + s.len)
            cap *= 2;
        batch.bytes = xrealloc(batch.bytes, cap);
        batch.cap = cap;
    }
    size_t at = batch.len;
    if (s.len)
        memcpy(batch.bytes + at, s.ptr, s.len);
    batch.len += s.len;
    return at;
}

static void push(mr_str key, mr_str value) {
    size_t k = append(key), v = append(value);
    batch.pairs[batch.n++] = (mr_kv){{(const char *)(uintptr_t)k, key.len},
                                     {(const char *)(uintptr_t)v, value.len}};
    if (batch.n == BATCH_PAIRS || batch.len >= BATCH_BYTES)
        flush_batch();
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

void mr__emitter_start(mr_combine_fn combine, mr_str contents) {
    table.combine = combine;
    batch.n = 0;
    batch.len = 0;
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

void mr_emit(mr_str key, mr_str value) {
    if (--where.countdown == 0)
        look(key, value);
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
    if (table.combine)
        flush_table();
    flush_batch();
}

// ---- Gathering a key's groups ----

static struct {
    bool active;
    mr_string key;
    mr_string *values;
    size_t n, cap;
} pending[2];

static void keep(int which, mr_str v) {
    if (pending[which].n == pending[which].cap) {
        pending[which].cap = pending[which].cap ? pending[which].cap * 2 : 64;
        pending[which].values =
            xrealloc(pending[which].values, pending[which].cap * sizeof(mr_string));
    }
    pending[which].values[pending[which].n++] = mr_string_copy(v);
}

static void drop_pending(int which) {
    for (size_t j = 0; j < pending[which].n; j++)
        free(pending[which].values[j].ptr);
    free(pending[which].key.ptr);
    pending[which].n = 0;
    pending[which].active = false;
}

// A combiner may run on any subset of a key's values: folds a combine key's
// values gathered so far into one, so a long run does not pile up here.
static void fold(int which, mr_reduce_fn f) {
    if (which != 1 || pending[which].n < 2)
        return;
    size_t total = pending[which].n;
    mr_str *all = xrealloc(NULL, total * sizeof(mr_str));
    for (size_t j = 0; j < total; j++)
        all[j] = (mr_str){pending[which].values[j].ptr, pending[which].values[j].len};
    mr_string folded = f((mr_str){pending[which].key.ptr, pending[which].key.len}, all, total);
    free(all);
    for (size_t j = 0; j < total; j++)
        free(pending[which].values[j].ptr);
    pending[which].values[0] = folded;
    pending[which].n = 1;
}

const char *mr__gather(int which, const mr_group *groups, size_t n, mr_reduce_fn f,
                       mr_string *out, size_t *n_out) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const mr_group *g = &groups[i];
        if (pending[which].active) {
            mr_str pkey = {pending[which].key.ptr, pending[which].key.len};
            if (!mr_str_eq(pkey, g->key)) {
                drop_pending(which);
                *n_out = k;
                return "host protocol error: a key ended without its last group";
            }
            for (size_t j = 0; j < g->n; j++)
                keep(which, g->values[j]);
            if (!g->last) {
                fold(which, f);
                continue;
            }
            size_t total = pending[which].n;
            mr_str *all = xrealloc(NULL, total * sizeof(mr_str));
            for (size_t j = 0; j < total; j++)
                all[j] = (mr_str){pending[which].values[j].ptr, pending[which].values[j].len};
            out[k++] = f(g->key, all, total);
            free(all);
            drop_pending(which);
        } else if (g->last) {
            out[k++] = f(g->key, g->values, g->n);
        } else {
            pending[which].active = true;
            pending[which].key = mr_string_copy(g->key);
            for (size_t j = 0; j < g->n; j++)
                keep(which, g->values[j]);
            fold(which, f);
        }
    }
    *n_out = k;
    return NULL;
}
