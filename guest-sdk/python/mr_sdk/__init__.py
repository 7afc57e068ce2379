"""The Python SDK for `mr` apps: write a class, export it, build it with
componentize-py (see apps/wc-python).

    import mr_sdk

    class WordCount(mr_sdk.App):
        def map(self, input, contents, out):
            for word in mr_sdk.words(contents):
                out.emit(word, "1")

        def reduce(self, key, values):
            return str(sum(int(v) for v in values))

        def combine(self, key, values):
            return self.reduce(key, values)

    WitWorld = mr_sdk.export(WordCount)

componentize-py looks for the class `WitWorld` in the app's module; the
module is named by the build (`componentize-py ... componentize app`).

What the SDK does for the app, as the Rust SDK does:
- Batching: `out.emit` buffers pairs and hands them to the host in lists
  of up to 8192 pairs or 1 MiB (one boundary crossing is costly).
- Combining: when the app's `combine` returns a value (not None), map
  output is combined inside the guest before it is emitted, in a table
  of bounded size.
- Progress: `words(contents)` tells the host how far into its input the
  map is, as it goes (a few hundred `progress` calls per split), assuming
  the map reads it once, in order; apps that read their input otherwise
  call `out.progress(done, total)` (which turns the reports of `words`
  off).
- Streaming keys: the host may deliver a key with very many values in
  several groups; the SDK gathers them and calls `reduce` once, or hands
  them one at a time to the object the app's `fold(key)` returns (its
  `add(value)`, then `finish()` for the output value), in memory that does
  not grow with their number.
- Errors: an exception in the app fails the task with its traceback.
"""

import re
import traceback

from ._letters import CLASS as _LETTER_CLASS

__all__ = ["App", "Emitter", "export", "words"]

# Pairs and bytes buffered before one `emit` call hands them to the host.
BATCH_PAIRS = 8192
BATCH_BYTES = 1 << 20
# Values of one key collected before the combiner folds them into one.
COMBINE_AT = 8
# Estimated bytes the combining table may hold before it is flushed to the
# host: bounds guest memory for apps with huge vocabularies.
TABLE_BYTES = 48 << 20
# Estimated bytes a table entry costs beyond its text (a dict slot, a list,
# the str objects' headers).
ENTRY_OVERHEAD = 200
# Characters of text scanned per regex call by `words` (so a large split
# never becomes one list of millions of words).
WORDS_CHUNK = 1 << 16
# Progress reports per map call, at most (and at least WORDS_CHUNK apart).
PROGRESS_STEPS = 256


def _u64(n):
    """`n` as the host's u64, clamped to its range; None if it is not a
    finite number."""
    try:
        n = int(n)
    except (TypeError, ValueError, OverflowError):
        return None
    return min(max(n, 0), 2**64 - 1)


class _Where:
    """The running map's contents, and where `words` reports next."""

    __slots__ = ("text", "report", "next", "step", "off")

    def __init__(self, text, report):
        self.text, self.report = text, report
        self.next = 0
        self.off = False  # the app reports by itself
        self.step = max(len(text) // PROGRESS_STEPS, WORDS_CHUNK)


# Set while a map runs (by `export`'s map).
_where = None

_WORD = re.compile("[" + _LETTER_CLASS + "]+")
_NON_LETTER = re.compile("[^" + _LETTER_CLASS + "]")


def words(text):
    """Yields the words of `text` the way the MIT 6.5840 lab splits them
    (Go's `unicode.IsLetter`): maximal runs of Unicode letters (general
    category L), case kept. The letters are the Rust SDK's, table for table:
    `str.isalpha` is category L too, but of the Unicode version of the
    Python that runs the app, which differs."""
    n = len(text)
    start = 0
    # Words of the map's own contents tell the host how far it is.
    where = _where if _where is not None and _where.text is text else None
    while start < n:
        end = start + WORDS_CHUNK
        if end >= n:
            end = n
        else:
            # Cut at a non-letter, so no word spans two chunks.
            m = _NON_LETTER.search(text, end)
            end = m.start() if m else n
        yield from _WORD.findall(text, start, end)
        start = end
        if where is not None and (start >= where.next or start == n) and not where.off:
            where.next = start + where.step
            where.report(start, n)


class App:
    """A MapReduce app. The SDK makes one instance per task."""

    def map(self, input, contents, out):
        """Maps one input (or one split of it, cut at a line boundary):
        calls `out.emit(key, value)` for every output pair. `input` is the
        input's name exactly as the user gave it."""
        raise NotImplementedError

    def reduce(self, key, values):
        """Reduces all values of one key (a list of str) to the output value
        (a str). Values arrive in an order that depends on scheduling. All
        of a key's values are in memory at once: for keys that may have
        millions, implement `fold` instead (this default uses it, so an
        app implements one of the two; `fold` must not call `reduce`)."""
        state = self.fold(key)
        if state is None:
            raise NotImplementedError("the app implements neither reduce nor fold")
        for v in values:
            state.add(v)
        return state.finish()

    def fold(self, key):
        """The optional streaming reduce (Hadoop's reducer over an iterator,
        Spark's aggregateByKey): return an object with `add(value)` and
        `finish()`, and the SDK hands it the key's values one at a time as
        the host delivers them, then takes `finish()` (a str) as the output
        value; `reduce` is then not called for the key. Return None (the
        default) to have `reduce` called."""
        return None

    def combine(self, key, values):
        """The optional combiner: merges some values of a key into one str
        before the shuffle; it must be safe to apply any number of times.
        Return None (the default) for no combiner."""
        return None


class Emitter:
    """Collects an app's map output and hands it to the host in batches,
    combining it first when the app has a combiner."""

    def __init__(self, combine, emit, kv, progress=None):
        self._combine = combine
        self._emit = emit  # the host's emit(list of kv)
        self._progress = progress  # the host's progress(done, total)
        self._kv = kv  # the binding's pair type
        self._combining = None  # unknown until the combiner is first asked
        self._table = {}
        self._table_bytes = 0
        self._batch = []
        self._batch_bytes = 0

    def emit(self, key, value):
        """Emits one intermediate pair (two str)."""
        if self._combining is False:
            self._push(key, value)
            return
        values = self._table.get(key)
        if values is None:
            self._table[key] = [value]
            self._table_bytes += len(key) + len(value) + ENTRY_OVERHEAD
            if self._table_bytes >= TABLE_BYTES:
                self._flush_table()
            return
        values.append(value)
        if len(values) >= COMBINE_AT:
            combined = self._combine(key, values)
            if combined is None:
                self._combining = False
                self._flush_table()
                return
            self._combining = True
            values[:] = [combined]

    def progress(self, done, total):
        """Tells the host that the map is `done` (characters, lines, any
        unit) of `total` through its input: for maps that do not split their
        contents with `words` (which reports by itself), or not in one pass
        in order. The first call turns the reports of `words` off for the
        rest of the map. Numbers are clamped to 0 .. 2**64 - 1; a call with
        something that is not a finite number is ignored. A few hundred
        calls per map are plenty; the host never moves progress back."""
        if _where is not None:
            _where.off = True
        done, total = _u64(done), _u64(total)
        if self._progress is None or done is None or total is None:
            return
        # componentize-py passes a u64 through a signed 64-bit integer:
        # halve both (their ratio is what counts) until they fit.
        while max(done, total) >= 2**63:
            done, total = done >> 1, total >> 1
        self._progress(done, total)

    def _push(self, key, value):
        self._batch.append(self._kv(key, value))
        self._batch_bytes += len(key) + len(value)
        if len(self._batch) >= BATCH_PAIRS or self._batch_bytes >= BATCH_BYTES:
            self._flush_batch()

    def _flush_table(self):
        table, self._table, self._table_bytes = self._table, {}, 0
        for key, values in table.items():
            if len(values) > 1 and self._combining is not False:
                combined = self._combine(key, values)
                if combined is not None:
                    self._combining = True
                    self._push(key, combined)
                    continue
                self._combining = False
            for value in values:
                self._push(key, value)

    def _flush_batch(self):
        if self._batch:
            self._emit(self._batch)
            self._batch = []
            self._batch_bytes = 0

    def finish(self):
        """Hands everything still held to the host (the SDK calls it after
        `map` returns)."""
        self._flush_table()
        self._flush_batch()


class _Gatherer:
    """Gathers groups (a key's values may come in several, all but the last
    with `last = False`) into whole keys."""

    def __init__(self, fold=False):
        self._pending = None  # (key, values or a fold's state, is it a fold)
        # A combiner may run on any subset of a key's values: with `fold`,
        # a key's values so far are folded into one whenever a group of it
        # is not its last, so a long run does not pile up in the guest.
        self._fold = fold

    def run(self, groups, f, start=None):
        """Calls `f(key, values)` once per whole key; returns the results,
        or None as soon as `f` returns None. `start(key)`, for a key's first
        group, may return a fold's state, which then takes the key's values
        as they come (`add`) and gives its result (`finish`) instead."""
        out = []
        for g in groups:
            folding = None
            if self._pending is not None:
                key, values, is_fold = self._pending
                if key != g.key:
                    raise ValueError(
                        f"host protocol error: key {key!r} ended without its last group"
                    )
                self._pending = None
                if is_fold:
                    folding = values
                else:
                    values.extend(g.values)
            else:
                key, values = g.key, g.values
                folding = start(key) if start is not None else None
            if folding is not None:
                for v in g.values:
                    folding.add(v)
                if g.last:
                    out.append(folding.finish())
                else:
                    self._pending = (key, folding, True)
                continue
            if g.last:
                r = f(key, values)
                if r is None:
                    return None
                out.append(r)
            else:
                values = list(values)
                if self._fold and len(values) > 1:
                    r = f(key, values)
                    if r is None:
                        return None
                    values = [r]
                self._pending = (key, values, False)
        return out


class _Checked:
    """A fold's state whose result is checked to be a str."""

    def __init__(self, state, key):
        self._state, self._key = state, key
        self.add = state.add

    def finish(self):
        r = self._state.finish()
        if not isinstance(r, str):
            raise TypeError(
                f"fold's finish returned {type(r).__name__} for key {self._key!r}, not str"
            )
        return r


def _app_error(err_type, what):
    return err_type(f"{what} failed:\n{traceback.format_exc()}")


def counter(name, delta=1):
    """Adds `delta` (an int) to the app's counter `name` (printable text
    of 1 to 64 bytes; an attempt may use 32 names): Hadoop's user counters. The
    job's report sums each counter over the attempts whose output was
    committed, one per task, so a retried or killed attempt's counts are
    not added twice. Works in map, reduce and combine."""
    if not isinstance(name, str):
        raise TypeError(f"a counter's name is a str, not {type(name).__name__}")
    if not isinstance(delta, int) or isinstance(delta, bool):
        raise TypeError(f"a counter's delta is an int, not {type(delta).__name__}")
    if not -(2**63) <= delta < 2**63:
        raise ValueError(f"a counter's delta is a 64-bit integer: {delta}")
    # Imported here, as in `export`: generated by componentize-py.
    from wit_world.imports import host

    host.counter(name, delta)


def export(app):
    """Returns the `WitWorld` class componentize-py exports for `app` (an
    `App` subclass or instance). Assign it to `WitWorld` in the app's
    module."""
    # Imported here: `wit_world` is generated by componentize-py for the
    # build, and is not needed to use `words` or `Emitter` elsewhere.
    import wit_world
    from wit_world.imports import host, types
    from componentize_py_types import Err

    instance = app() if isinstance(app, type) else app
    reducing = _Gatherer()
    combining = _Gatherer(fold=True)

    def reduce_one(key, values):
        r = instance.reduce(key, values)
        if not isinstance(r, str):
            raise TypeError(f"reduce returned {type(r).__name__} for key {key!r}, not str")
        return r

    def fold_one(key):
        state = instance.fold(key)
        if state is None:
            return None
        return _Checked(state, key)

    class WitWorld(wit_world.WitWorld):
        def map(self, input, contents):
            global _where
            try:
                _where = _Where(contents, host.progress)
                out = Emitter(instance.combine, host.emit, types.Kv, host.progress)
                instance.map(input, contents, out)
                out.finish()
            except Exception:
                raise _app_error(Err, f"map of {input!r}")
            finally:
                _where = None

        def reduce(self, groups):
            try:
                return reducing.run(groups, reduce_one, fold_one)
            except Exception:
                raise _app_error(Err, "reduce")

        def combine(self, groups):
            try:
                return combining.run(groups, instance.combine)
            except Exception:
                raise _app_error(Err, "combine")

    return WitWorld
