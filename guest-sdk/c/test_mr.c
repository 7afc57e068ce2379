// Unit tests of the C SDK's core (mr.c), built natively against a fake host
// (`make -C guest-sdk/c test`; tests/all/languages.rs runs it). Exits
// non-zero on the first failure.

#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mr.h"

static int checks;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        checks++;                                                                                  \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);              \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static bool eq(mr_str s, const char *c) { return mr_str_eq(s, mr_str_c(c)); }

// ---- A fake host: records every batch ----

#define MAX_PAIRS 20000
static struct {
    char *keys[MAX_PAIRS], *values[MAX_PAIRS];
    size_t value_lens[MAX_PAIRS];
    size_t n, batches, largest_batch, largest_bytes;
} host;

static struct {
    uint64_t done[1024], total[1024];
    size_t n;
} reports;

void mr__host_progress(uint64_t done, uint64_t total) {
    CHECK(reports.n < 1024);
    reports.done[reports.n] = done;
    reports.total[reports.n] = total;
    reports.n++;
}

static struct {
    char name[256];
    int64_t total;
    size_t calls;
} counted;

void mr__host_counter(mr_str name, int64_t delta) {
    CHECK(name.len < sizeof counted.name);
    memcpy(counted.name, name.ptr, name.len);
    counted.name[name.len] = 0;
    counted.total += delta;
    counted.calls++;
}

// mr_counter hands its name and delta to the host as they are.
static void test_counter(void) {
    mr_counter((mr_str){"lines", 5}, 3);
    mr_counter((mr_str){"lines", 5}, -1);
    CHECK(counted.calls == 2);
    CHECK(strcmp(counted.name, "lines") == 0);
    CHECK(counted.total == 2);
}

static uint32_t varint(const uint8_t **p, const uint8_t *end) {
    uint32_t v = 0;
    for (int i = 0; i < 5; i++) {
        CHECK(*p < end);
        uint8_t b = *(*p)++;
        v |= (uint32_t)(b & 0x7f) << (7 * i);
        if (b < 0x80)
            return v;
    }
    CHECK(!"a varint of more than 5 bytes");
    return 0;
}

// Decodes a batch of records as the host does (and checks its framing).
void mr__host_emit(const uint8_t *records, size_t len) {
    const uint8_t *p = records, *end = records + len;
    size_t n = 0, bytes = 0;
    while (p < end) {
        CHECK(host.n < MAX_PAIRS);
        uint32_t klen = varint(&p, end), vlen = varint(&p, end);
        CHECK((size_t)(end - p) >= (size_t)klen + vlen);
        host.keys[host.n] = strndup((const char *)p, klen);
        host.values[host.n] = strndup((const char *)p + klen, vlen);
        host.value_lens[host.n] = vlen;
        host.n++;
        p += klen + vlen;
        bytes += klen + vlen;
        n++;
    }
    CHECK(n > 0);
    host.batches++;
    if (n > host.largest_batch)
        host.largest_batch = n;
    if (bytes > host.largest_bytes)
        host.largest_bytes = bytes;
}

static void host_reset(void) {
    for (size_t i = 0; i < host.n; i++) {
        free(host.keys[i]);
        free(host.values[i]);
    }
    memset(&host, 0, sizeof host);
}

// The host's total for `key` (values summed as numbers).
static uint64_t host_total(const char *key) {
    uint64_t t = 0;
    for (size_t i = 0; i < host.n; i++)
        if (strcmp(host.keys[i], key) == 0)
            t += strtoull(host.values[i], NULL, 10);
    return t;
}

static size_t combine_calls;

static mr_string sum(mr_str key, const mr_str *values, size_t n) {
    (void)key;
    combine_calls++;
    uint64_t t = 0;
    for (size_t i = 0; i < n; i++)
        t += mr_parse_u64(values[i]);
    return mr_string_u64(t);
}

static mr_string join(mr_str key, const mr_str *values, size_t n) {
    (void)key;
    size_t len = 0;
    for (size_t i = 0; i < n; i++)
        len += values[i].len + 1;
    char *p = malloc(len + 1), *q = p;
    for (size_t i = 0; i < n; i++) {
        memcpy(q, values[i].ptr, values[i].len);
        q += values[i].len;
        *q++ = ',';
    }
    return (mr_string){p, n ? len - 1 : 0};
}

// ---- Tests ----

static void test_words(void) {
    // 'Ⅻ' (U+216B, a letter number) is alphabetic but not a letter; 'ǅ'
    // (U+01C5) is a titlecase letter; U+FFFD and stray bytes are not letters.
    const char *text = "Hello, w\xc3\xb6rld! it's 42x--\xc7\x85 \xe2\x85\xab\xef\xbf\xbd"
                       "a\xff" "b\xe2\x82z \xf0\x90\x80\x80";
    const char *want[] = {"Hello", "w\xc3\xb6rld", "it", "s", "x", "\xc7\x85", "a", "b",
                          "z", "\xf0\x90\x80\x80"};
    mr_str rest = mr_str_c(text), w;
    size_t n = 0;
    while (mr_next_word(&rest, &w)) {
        CHECK(n < sizeof want / sizeof want[0]);
        CHECK(eq(w, want[n]));
        n++;
    }
    CHECK(n == sizeof want / sizeof want[0]);
    CHECK(rest.len == 0);
    mr_str empty = MR_STR("");
    CHECK(!mr_next_word(&empty, &w));
    CHECK(mr_is_letter('q') && !mr_is_letter('_') && mr_is_letter(0x4E00) && !mr_is_letter(0x216B));
}

// The words of `text` found one character at a time, as the definition
// says (the reference for mr_next_word's eight-bytes-at-a-time scan):
// maximal runs of letters, where a byte that starts no valid sequence of
// the lengths UTF-8 allows is U+FFFD on its own.
static size_t reference_words(const unsigned char *s, size_t len, size_t *starts, size_t *lens) {
    size_t n = 0, i = 0, start = 0;
    bool in_word = false;
    while (i <= len) {
        uint32_t c = 0xFFFD;
        size_t k = 1;
        if (i < len) {
            unsigned b = s[i];
            size_t need = b < 0x80 ? 1 : b >= 0xC2 && b < 0xE0 ? 2 : b >= 0xE0 && b < 0xF0 ? 3
                        : b >= 0xF0 && b < 0xF5 ? 4 : 0;
            c = need == 1 ? b : need == 2 ? (b & 0x1F) : need == 3 ? (b & 0x0F) : (b & 0x07);
            bool ok = need > 0 && i + need <= len;
            for (size_t j = 1; ok && j < need; j++) {
                ok = (s[i + j] & 0xC0) == 0x80;
                c = (c << 6) | (s[i + j] & 0x3F);
            }
            if (ok)
                k = need;
            else
                c = 0xFFFD;
        }
        bool letter = i < len && mr_is_letter(c);
        if (letter && !in_word)
            start = i, in_word = true;
        if (!letter && in_word) {
            starts[n] = start, lens[n] = i - start, n++;
            in_word = false;
        }
        i += k;
    }
    return n;
}

// mr_next_word splits as the reference does, on any mix of ASCII letters,
// digits and punctuation, letters and non-letters of other scripts, and
// bytes that are not UTF-8, at every alignment against its 8-byte loads.
static void test_words_match_the_definition(void) {
    const char *pieces[] = {"a", "Z", "q", "xyzzy", "0", "9", " ", "\n", "'", "-", "_", "@", "[",
                            "`", "{", "\x7f", "\xc3\xa9", "\xc7\x85", "\xe4\xb8\xad",
                            "\xe2\x85\xab", "\xef\xbf\xbd", "\xf0\x90\x80\x80", "\xcc\x81",
                            "\xff", "\x80", "\xc3", "\xe4\xb8", "\xf0\x90"};
    size_t npieces = sizeof pieces / sizeof pieces[0];
    uint64_t rng = 0x2545F4914F6CDD1Dull;
    unsigned char text[256];
    size_t starts[256], lens[256];
    for (int round = 0; round < 20000; round++) {
        size_t len = 0;
        size_t count = (size_t)(rng >> 59);
        for (size_t i = 0; i < count; i++) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            const char *p = pieces[rng % npieces];
            // Long runs of one piece reach the 8-byte paths.
            size_t times = (rng >> 32) % 4 == 0 ? 1 + (rng >> 40) % 12 : 1;
            for (size_t t = 0; t < times && len + strlen(p) <= sizeof text; t++) {
                memcpy(text + len, p, strlen(p));
                len += strlen(p);
            }
        }
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        size_t want = reference_words(text, len, starts, lens);
        // The text alone in a block of its size: a read past its end shows
        // under AddressSanitizer, which `make test` builds with.
        char *alone = malloc(len ? len : 1);
        memcpy(alone, text, len);
        mr_str rest = {alone, len}, w;
        size_t got = 0;
        while (mr_next_word(&rest, &w)) {
            CHECK(got < want);
            CHECK(w.ptr == alone + starts[got] && w.len == lens[got]);
            got++;
        }
        CHECK(got == want && rest.len == 0);
        free(alone);
    }
}

static void test_numbers(void) {
    mr_string s = mr_string_u64(0);
    CHECK(s.len == 1 && s.ptr[0] == '0');
    free(s.ptr);
    s = mr_string_u64(UINT64_MAX);
    CHECK(mr_str_eq((mr_str){s.ptr, s.len}, MR_STR("18446744073709551615")));
    CHECK(mr_parse_u64((mr_str){s.ptr, s.len}) == UINT64_MAX);
    free(s.ptr);
    CHECK(mr_parse_u64(MR_STR("0042")) == 42);
}

static void test_batches_without_combiner(void) {
    host_reset();
    mr__emitter_start(NULL, MR_COMBINE_TEXT, MR_STR(""));
    char key[16];
    for (int i = 0; i < 10000; i++) {
        int len = snprintf(key, sizeof key, "k%d", i % 7);
        mr_emit((mr_str){key, (size_t)len}, MR_STR("1"));
    }
    mr__emitter_finish();
    // Raw pairs, in order, in batches of at most 8192.
    CHECK(host.n == 10000);
    CHECK(host.batches == 2);
    CHECK(host.largest_batch == 8192);
    CHECK(strcmp(host.keys[9999], "k3") == 0);
    // A batch is also cut at 1 MiB of keys and values.
    host_reset();
    mr__emitter_start(NULL, MR_COMBINE_TEXT, MR_STR(""));
    char *big = malloc(600 << 10);
    memset(big, 'v', 600 << 10);
    for (int i = 0; i < 5; i++)
        mr_emit(MR_STR("big"), (mr_str){big, 600 << 10});
    mr__emitter_finish();
    free(big);
    CHECK(host.n == 5);
    CHECK(host.batches == 3);
    CHECK(host.largest_bytes < (2u << 20));
    CHECK(host.value_lens[4] == 600 << 10);
}

// Keys and values of every length up to 40 reach the host byte for byte
// (short ones are copied by fixed-size loads and stores), and so do keys
// summed in place (copied into the table's arena, then into a batch).
static void test_copies_of_every_length(void) {
    char key[41], value[41];
    for (int combined = 0; combined < 2; combined++) {
        host_reset();
        mr__emitter_start(combined ? sum : NULL, combined ? MR_COMBINE_SUM_U64 : MR_COMBINE_TEXT,
                          MR_STR(""));
        for (size_t k = 0; k <= 40; k++) {
            for (size_t i = 0; i < k; i++)
                key[i] = (char)('A' + (k * 7 + i * 3) % 26);
            for (size_t v = combined; v <= (combined ? 1 : 40); v++) {
                for (size_t i = 0; i < v; i++)
                    value[i] = (char)('a' + (k + v * 5 + i) % 26);
                if (combined)
                    value[0] = '7';
                mr_emit((mr_str){key, k}, (mr_str){value, v});
            }
        }
        mr__emitter_finish();
        CHECK(host.n == (combined ? 41 : 41 * 41));
        for (size_t n = 0; n < host.n; n++) {
            size_t k = strlen(host.keys[n]);
            size_t v = combined ? 1 : n % 41;
            CHECK(combined || k == n / 41);
            for (size_t i = 0; i < k; i++)
                CHECK(host.keys[n][i] == (char)('A' + (k * 7 + i * 3) % 26));
            CHECK(host.value_lens[n] == v);
            for (size_t i = 0; i < v; i++)
                CHECK(host.values[n][i] == (combined ? '7' : (char)('a' + (k + v * 5 + i) % 26)));
        }
    }
}

static void test_combining(void) {
    host_reset();
    combine_calls = 0;
    mr__emitter_start(sum, MR_COMBINE_TEXT, MR_STR(""));
    for (int i = 0; i < 20; i++)
        mr_emit(MR_STR("a"), MR_STR("1"));
    mr_emit(MR_STR("b"), MR_STR("5"));
    mr_emit(MR_STR(""), MR_STR("2"));
    mr_emit(MR_STR(""), MR_STR("3"));
    mr__emitter_finish();
    // One pair per key: the table combined every 8 values, then at the end.
    CHECK(host.n == 3);
    CHECK(host_total("a") == 20);
    CHECK(host_total("b") == 5);
    CHECK(host_total("") == 5);
    CHECK(combine_calls == 2 + 1 + 1);
    // Many distinct keys (table growth), each with a few values.
    host_reset();
    mr__emitter_start(sum, MR_COMBINE_TEXT, MR_STR(""));
    char key[16];
    for (int round = 0; round < 3; round++)
        for (int i = 0; i < 5000; i++) {
            int len = snprintf(key, sizeof key, "w%d", i);
            mr_emit((mr_str){key, (size_t)len}, MR_STR("2"));
        }
    mr__emitter_finish();
    CHECK(host.n == 5000);
    CHECK(host_total("w0") == 6 && host_total("w4999") == 6);
}

// Counts (MR_COMBINE_SUM_U64) are added up in the guest without calling
// combine; what is not a count, or would pass UINT64_MAX, goes as it is.
static void test_sums(void) {
    host_reset();
    combine_calls = 0;
    mr__emitter_start(sum, MR_COMBINE_SUM_U64, MR_STR(""));
    for (int i = 0; i < 20; i++)
        mr_emit_u64(MR_STR("a"), 1);
    mr_emit(MR_STR("a"), MR_STR("22"));
    mr_emit(MR_STR("a long key past eight bytes"), MR_STR("3"));
    mr_emit_u64(MR_STR("a long key past eight bytes"), 4);
    mr_emit_u64(MR_STR("a long key past eight bytez"), 1);
    mr_emit(MR_STR("b"), MR_STR("not a count"));
    mr_emit_u64(MR_STR("big"), UINT64_MAX);
    mr_emit_u64(MR_STR("big"), 1);
    mr_emit(MR_STR(""), MR_STR("7"));
    mr__emitter_finish();
    CHECK(combine_calls == 0);
    CHECK(host_total("a") == 42);
    CHECK(host_total("a long key past eight bytes") == 7);
    CHECK(host_total("a long key past eight bytez") == 1);
    CHECK(host_total("") == 7);
    size_t as = 0, bs = 0, bigs = 0;
    for (size_t i = 0; i < host.n; i++) {
        as += strcmp(host.keys[i], "a") == 0;
        if (strcmp(host.keys[i], "b") == 0) {
            bs++;
            CHECK(strcmp(host.values[i], "not a count") == 0);
        }
        bigs += strcmp(host.keys[i], "big") == 0;
    }
    CHECK(as == 1 && bs == 1 && bigs == 2);
    // Many distinct keys over several maps: the table grows, is flushed
    // and reused.
    char key[16];
    for (int map = 0; map < 3; map++) {
        host_reset();
        mr__emitter_start(sum, MR_COMBINE_SUM_U64, MR_STR(""));
        for (int round = 0; round < 3; round++)
            for (int i = 0; i < 6000; i++) {
                int len = snprintf(key, sizeof key, "w%d", i);
                mr_emit_u64((mr_str){key, (size_t)len}, (uint64_t)round + 1);
            }
        mr__emitter_finish();
        CHECK(host.n == 6000);
        CHECK(host_total("w0") == 6 && host_total("w5999") == 6);
    }
    // Keys of every length to 20 that differ in one byte (each place in
    // turn) are counted apart, each twice: heads, tails and hashes are
    // loaded in pieces, not by memcpy.
    host_reset();
    mr__emitter_start(sum, MR_COMBINE_SUM_U64, MR_STR(""));
    const char *base = "abcdefghijklmnopqrst";
    size_t distinct = 0;
    for (int pass = 0; pass < 2; pass++)
        for (size_t len = 1; len <= 20; len++)
            for (size_t at = 0; at <= len; at++) {
                char k[21];
                memcpy(k, base, len);
                if (at < len)
                    k[at] = 'Z'; // at == len: the base itself
                mr_emit_u64((mr_str){k, len}, 1);
                distinct += pass == 0;
            }
    mr__emitter_finish();
    CHECK(host.n == distinct);
    CHECK(host_total("abcdefghijklmnop") == 2 && host_total("abcdefghZjklmnop") == 2);
    CHECK(host_total("abcdefghijklmnopqrsZ") == 2 && host_total("Zb") == 2);
    // Without the SUM_U64 declaration, mr_emit_u64 is mr_emit of the digits.
    host_reset();
    mr__emitter_start(NULL, MR_COMBINE_TEXT, MR_STR(""));
    mr_emit_u64(MR_STR("x"), 12345);
    mr__emitter_finish();
    CHECK(host.n == 1 && strcmp(host.values[0], "12345") == 0);
}

// Groups as the host encodes them decode to the same keys, values and
// flags; malformed ones are refused; values encode as varint and bytes.
static void test_encodings(void) {
    static const uint8_t batch[] = {1, 1, 'a', 2, 1, 'x', 0,      //
                                    0, 2, 'k', 'k', 1, 2, 'y', 'z', //
                                    1, 0, 0};
    mr_group *gs;
    mr_str *vs;
    size_t n;
    CHECK(mr__decode_groups(batch, sizeof batch, &gs, &n, &vs) == NULL);
    CHECK(n == 3);
    CHECK(eq(gs[0].key, "a") && gs[0].last && gs[0].n == 2 && eq(gs[0].values[0], "x") &&
          eq(gs[0].values[1], ""));
    CHECK(eq(gs[1].key, "kk") && !gs[1].last && gs[1].n == 1 && eq(gs[1].values[0], "yz"));
    CHECK(eq(gs[2].key, "") && gs[2].last && gs[2].n == 0);
    free(gs);
    free(vs);
    CHECK(mr__decode_groups(batch, 0, &gs, &n, &vs) == NULL && n == 0);
    free(gs);
    free(vs);
    // Every cut short of the end is refused, as are bad flags and varints.
    for (size_t cut = 1; cut < sizeof batch; cut++) {
        if (cut == 7 || cut == 15)
            continue; // whole groups end there
        CHECK(mr__decode_groups(batch, cut, &gs, &n, &vs) != NULL);
        CHECK(gs == NULL && vs == NULL && n == 0);
    }
    static const uint8_t flags[] = {2, 0, 0};
    CHECK(mr__decode_groups(flags, sizeof flags, &gs, &n, &vs) != NULL);
    static const uint8_t long_varint[] = {1, 0x80, 0x80, 0x80, 0x80, 0x80, 0};
    CHECK(mr__decode_groups(long_varint, sizeof long_varint, &gs, &n, &vs) != NULL);
    static const uint8_t past_32_bits[] = {1, 0, 0xff, 0xff, 0xff, 0xff, 0x1f};
    CHECK(mr__decode_groups(past_32_bits, sizeof past_32_bits, &gs, &n, &vs) != NULL);
    static const uint8_t huge_count[] = {1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f};
    CHECK(mr__decode_groups(huge_count, sizeof huge_count, &gs, &n, &vs) != NULL);
    char *big = malloc(300);
    memset(big, 'b', 300);
    mr_string out[] = {{(char *)"", 0}, {(char *)"7", 1}, {big, 300}};
    size_t len;
    uint8_t *bytes = mr__encode_values(out, 3, &len);
    CHECK(len == 1 + 2 + 2 + 300);
    CHECK(bytes[0] == 0 && bytes[1] == 1 && bytes[2] == '7' && bytes[3] == ((300 & 0x7f) | 0x80) &&
          bytes[4] == 300 >> 7 && bytes[5] == 'b');
    free(bytes);
    free(big);
}

// The number of values, and the values after the first joined by ';'
// when the first is itself a count: "2;3" is a fold of two, then "3".
static mr_string count(mr_str key, const mr_str *values, size_t n) {
    (void)key;
    char *p = malloc(64);
    int len = snprintf(p, 64, "%zu", n);
    if (n == 2 && values[0].len == 1 && values[0].ptr[0] == '2')
        len = snprintf(p, 64, "2;%.*s", (int)values[1].len, values[1].ptr);
    return (mr_string){p, (size_t)len};
}

static void test_gather(void) {
    mr_str v1[] = {MR_STR("1"), MR_STR("2")}, v2[] = {MR_STR("3")}, v3[] = {MR_STR("x")};
    mr_string out[4];
    size_t n = 0;
    // Key "k" arrives in three groups over two calls; "m" whole.
    mr_group first[] = {{MR_STR("a"), v3, 1, true}, {MR_STR("k"), v1, 2, false}};
    CHECK(mr__gather(0, first, 2, join, NULL, out, &n) == NULL);
    CHECK(n == 1 && mr_str_eq((mr_str){out[0].ptr, out[0].len}, MR_STR("x")));
    free(out[0].ptr);
    mr_group second[] = {{MR_STR("k"), v2, 1, false}, {MR_STR("k"), v1, 1, true},
                         {MR_STR("m"), v2, 1, true}};
    CHECK(mr__gather(0, second, 3, join, NULL, out, &n) == NULL);
    CHECK(n == 2);
    CHECK(mr_str_eq((mr_str){out[0].ptr, out[0].len}, MR_STR("1,2,3,1")));
    CHECK(mr_str_eq((mr_str){out[1].ptr, out[1].len}, MR_STR("3")));
    free(out[0].ptr);
    free(out[1].ptr);
    // A key that ends without its last group is the host's error.
    mr_group broken[] = {{MR_STR("p"), v1, 2, false}, {MR_STR("q"), v2, 1, true}};
    CHECK(mr__gather(1, broken, 2, join, NULL, out, &n) != NULL);
    // Combining (1) folds a key's values so far at each group that is not
    // its last: the last call sees the fold ("2": two values) and "3".
    mr_group c1[] = {{MR_STR("k"), v1, 2, false}};
    CHECK(mr__gather(1, c1, 1, count, NULL, out, &n) == NULL && n == 0);
    mr_group c2[] = {{MR_STR("k"), v2, 1, true}};
    CHECK(mr__gather(1, c2, 1, count, NULL, out, &n) == NULL && n == 1);
    CHECK(mr_str_eq((mr_str){out[0].ptr, out[0].len}, MR_STR("2;3")));
    free(out[0].ptr);
    // Many values over many calls (the packed store grows), empty and
    // multi-byte ones kept as they were.
    mr_str many[5000];
    for (size_t j = 0; j < 5000; j++)
        many[j] = j % 3 == 0 ? MR_STR("") : j % 3 == 1 ? MR_STR("\xc3\xa9") : MR_STR("1234567");
    for (int c = 0; c < 20; c++) {
        mr_group g[] = {{MR_STR("hot"), many, 5000, false}};
        CHECK(mr__gather(0, g, 1, count, NULL, out, &n) == NULL && n == 0);
    }
    mr_str tail[] = {MR_STR(""), MR_STR("\xc3\xa9")};
    mr_group g_last[] = {{MR_STR("hot"), tail, 2, true}};
    CHECK(mr__gather(0, g_last, 1, count, NULL, out, &n) == NULL && n == 1);
    CHECK(mr_str_eq((mr_str){out[0].ptr, out[0].len}, MR_STR("100002")));
    free(out[0].ptr);
    mr_group j1[] = {{MR_STR("j"), many, 3, false}};
    mr_group j2[] = {{MR_STR("j"), tail, 2, true}};
    CHECK(mr__gather(0, j1, 1, join, NULL, out, &n) == NULL && n == 0);
    CHECK(mr__gather(0, j2, 1, join, NULL, out, &n) == NULL && n == 1);
    CHECK(mr_str_eq((mr_str){out[0].ptr, out[0].len}, MR_STR(",\xc3\xa9,1234567,,\xc3\xa9")));
    free(out[0].ptr);
}

// A fold's state: a running sum, and how many values it took.
typedef struct {
    uint64_t sum;
    size_t n;
} sum_state;

static size_t fold_states; // live states

static void *sum_start(mr_str key) {
    (void)key;
    fold_states++;
    return calloc(1, sizeof(sum_state));
}

static void sum_add(void *state, mr_str v) {
    sum_state *s = state;
    s->sum += mr_parse_u64(v);
    s->n++;
}

static mr_string sum_finish(void *state) {
    sum_state *s = state;
    char *p = malloc(64);
    int len = snprintf(p, 64, "%llu/%zu", (unsigned long long)s->sum, s->n);
    free(s);
    fold_states--;
    return (mr_string){p, (size_t)len};
}

// A fold takes a key's values as they come, over several calls, and its
// state is freed at the key's end or at a protocol error.
static void test_fold(void) {
    mr_fold fold = {sum_start, sum_add, sum_finish};
    mr_str v1[] = {MR_STR("1"), MR_STR("2")}, v2[] = {MR_STR("30")};
    mr_string out[4];
    size_t n = 0;
    mr_group c1[] = {{MR_STR("k"), v1, 2, false}};
    CHECK(mr__gather(0, c1, 1, NULL, &fold, out, &n) == NULL && n == 0);
    CHECK(fold_states == 1);
    mr_group c2[] = {{MR_STR("k"), v2, 1, false}};
    CHECK(mr__gather(0, c2, 1, NULL, &fold, out, &n) == NULL && n == 0);
    mr_group c3[] = {{MR_STR("k"), v1, 1, true}, {MR_STR("m"), v2, 1, true}};
    CHECK(mr__gather(0, c3, 2, NULL, &fold, out, &n) == NULL && n == 2);
    CHECK(mr_str_eq((mr_str){out[0].ptr, out[0].len}, MR_STR("34/4")));
    CHECK(mr_str_eq((mr_str){out[1].ptr, out[1].len}, MR_STR("30/1")));
    free(out[0].ptr);
    free(out[1].ptr);
    CHECK(fold_states == 0);
    // A key that ends without its last group: an error, its state freed.
    mr_group b1[] = {{MR_STR("p"), v1, 2, false}};
    CHECK(mr__gather(0, b1, 1, NULL, &fold, out, &n) == NULL && n == 0);
    mr_group b2[] = {{MR_STR("q"), v2, 1, true}};
    CHECK(mr__gather(0, b2, 1, NULL, &fold, out, &n) != NULL);
    CHECK(fold_states == 0);
}

// Words of the contents tell the host how far the map is; keys of the
// app's own tell nothing unless it says.
static void test_progress(void) {
    size_t len = 23 * 100000;
    char *text = malloc(len);
    for (size_t i = 0; i < len; i += 23)
        memcpy(text + i, "alpha beta gamma delta ", 23);
    host_reset();
    reports.n = 0;
    mr_str contents = {text, len}, rest = contents, word;
    mr__emitter_start(sum, MR_COMBINE_TEXT, contents);
    while (mr_next_word(&rest, &word))
        mr_emit(word, MR_STR("1"));
    // Looks are 4096 pairs apart, at most 6 bytes each ("gamma "): a
    // report comes within one look past each step.
    size_t step = 64 << 10, look = 6 * 4096;
    CHECK(reports.n + 1 >= len / (step + look) && reports.n <= 257);
    for (size_t i = 0; i < reports.n; i++) {
        CHECK(reports.total[i] == len);
        CHECK(i == 0 || reports.done[i] > reports.done[i - 1]);
    }
    CHECK(reports.done[reports.n - 1] + step + look >= len);
    mr__emitter_finish();
    reports.n = 0;
    char key[8] = "ALPHA";
    mr__emitter_start(sum, MR_COMBINE_TEXT, contents);
    for (int i = 0; i < 20000; i++)
        mr_emit((mr_str){key, 5}, MR_STR("1"));
    CHECK(reports.n == 0);
    mr_progress(5, 10);
    CHECK(reports.n == 1 && reports.done[0] == 5 && reports.total[0] == 10);
    mr__emitter_finish();
    // The app's own report turns the SDK's off for the rest of the map.
    reports.n = 0;
    rest = contents;
    mr__emitter_start(sum, MR_COMBINE_TEXT, contents);
    mr_progress(1, 3);
    while (mr_next_word(&rest, &word))
        mr_emit(word, MR_STR("1"));
    CHECK(reports.n == 1 && reports.done[0] == 1 && reports.total[0] == 3);
    mr__emitter_finish();
    free(text);
}

int main(void) {
    test_words();
    test_words_match_the_definition();
    test_numbers();
    test_batches_without_combiner();
    test_copies_of_every_length();
    test_combining();
    test_sums();
    test_encodings();
    test_gather();
    test_fold();
    test_progress();
    test_counter();
    host_reset();
    printf("C SDK: %d checks passed\n", checks);
    return 0;
}
