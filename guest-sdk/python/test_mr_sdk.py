"""Unit tests of the Python SDK, run natively:

    python -m unittest discover -s guest-sdk/python

(tests/all/languages.rs runs them with the componentize-py virtualenv's
python, so the `export` tests can generate the bindings they need.)"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import mr_sdk


class Host:
    """A fake host `emit`: records batches."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append([(kv.key, kv.value) for kv in batch])

    def pairs(self):
        return [p for b in self.batches for p in b]

    def total(self, key):
        return sum(int(v) for k, v in self.pairs() if k == key)


class Kv:
    def __init__(self, key, value):
        self.key, self.value = key, value


class Group:
    def __init__(self, key, values, last):
        self.key, self.values, self.last = key, values, last


def summing(calls):
    def combine(key, values):
        calls.append(len(values))
        return str(sum(int(v) for v in values))

    return combine


class WordsTest(unittest.TestCase):
    def test_words_are_runs_of_letters(self):
        # 'Ⅻ' (U+216B) is a letter number, not a letter; U+FFFD is not a
        # letter; U+1E5D0 is a letter since Unicode 16, whatever Python's own
        # Unicode version says.
        text = "Hello, wörld! it's 42x--ǅ Ⅻ\ufffda b𐀀 \U0001e5d0."
        self.assertEqual(
            list(mr_sdk.words(text)), ["Hello", "wörld", "it", "s", "x", "ǅ", "a", "b𐀀", "\U0001e5d0"]
        )
        self.assertEqual(list(mr_sdk.words("")), [])

    def test_chunking_never_splits_a_word(self):
        text = "alpha beta\ngamma-delta epsilon " * 50 + "z"
        whole = list(mr_sdk.words(text))
        old = mr_sdk.WORDS_CHUNK
        try:
            for chunk in (1, 3, 7, 64):
                mr_sdk.WORDS_CHUNK = chunk
                self.assertEqual(list(mr_sdk.words(text)), whole)
        finally:
            mr_sdk.WORDS_CHUNK = old


class EmitterTest(unittest.TestCase):
    def test_without_combiner_pairs_go_out_raw_in_bounded_batches(self):
        host = Host()
        out = mr_sdk.Emitter(lambda k, v: None, host, Kv)
        for i in range(10000):
            out.emit(f"k{i % 7}", "1")
        out.finish()
        self.assertEqual(len(host.pairs()), 10000)
        self.assertEqual([len(b) for b in host.batches], [8192, 1808])
        self.assertEqual(host.total("k3"), 1429)

    def test_a_batch_is_cut_at_a_mebibyte(self):
        host = Host()
        out = mr_sdk.Emitter(lambda k, v: None, host, Kv)
        for _ in range(5):
            out.emit("big", "v" * (600 << 10))
        out.finish()
        self.assertEqual([len(b) for b in host.batches], [2, 2, 1])

    def test_combining_folds_every_eight_values_and_at_the_end(self):
        host, calls = Host(), []
        out = mr_sdk.Emitter(summing(calls), host, Kv)
        for _ in range(20):
            out.emit("a", "1")
        out.emit("b", "5")
        out.emit("", "2")
        out.emit("", "3")
        out.finish()
        self.assertEqual(sorted(host.pairs()), [("", "5"), ("a", "20"), ("b", "5")])
        self.assertEqual(calls, [8, 8, 6, 2])

    def test_a_full_table_is_flushed(self):
        host = Host()
        out = mr_sdk.Emitter(summing([]), host, Kv)
        old = mr_sdk.TABLE_BYTES
        try:
            mr_sdk.TABLE_BYTES = 10 * (mr_sdk.ENTRY_OVERHEAD + 3)
            for i in range(100):
                out.emit(f"w{i:02}", "1")
            self.assertGreater(len(host.pairs()) + len(out._batch), 0)
            out.finish()
        finally:
            mr_sdk.TABLE_BYTES = old
        self.assertEqual(sorted(host.pairs()), [(f"w{i:02}", "1") for i in range(100)])

    def test_no_combiner_found_late_loses_nothing(self):
        host = Host()
        out = mr_sdk.Emitter(lambda k, v: None, host, Kv)
        for i in range(50):
            out.emit("x", str(i))
            out.emit(f"y{i}", "1")
        out.finish()
        self.assertEqual(sorted(int(v) for k, v in host.pairs() if k == "x"), list(range(50)))
        self.assertEqual(len(host.pairs()), 100)


class ProgressTest(unittest.TestCase):
    def setUp(self):
        self.reports = []
        self.contents = "a b " * 100000
        report = lambda d, t: self.reports.append((d, t))
        # As the SDK's map sets it: this map's contents are `contents`.
        mr_sdk._where = mr_sdk._Where(self.contents, report)
        self.out = mr_sdk.Emitter(lambda k, v: None, Host(), Kv, report)

    def tearDown(self):
        mr_sdk._where = None

    def test_words_of_other_text_report_nothing_and_out_progress_does(self):
        list(mr_sdk.words("a b " * 100000))
        self.assertEqual(self.reports, [])
        list(mr_sdk.words(self.contents))
        self.assertGreater(len(self.reports), 1)
        self.reports.clear()
        self.out.progress(3, 4)
        self.assertEqual(self.reports, [(3, 4)])

    def test_the_apps_own_report_turns_words_off(self):
        self.out.progress(1, 3)
        list(mr_sdk.words(self.contents))
        self.assertEqual(self.reports, [(1, 3)])

    def test_progress_is_clamped_to_u64_and_not_a_number_is_ignored(self):
        self.out.progress(-5, 2**70)
        self.out.progress(float("nan"), 10)
        self.out.progress(1, float("inf"))
        self.out.progress(2.7, 10)
        self.out.progress(2**64, 2**64)
        m = 2**63 - 1
        self.assertEqual(self.reports, [(0, m), (2, 10), (m, m)])


class GathererTest(unittest.TestCase):
    def test_split_groups_are_gathered_into_one_call(self):
        g = mr_sdk._Gatherer()
        join = lambda k, v: f"{k}:{','.join(v)}"
        self.assertEqual(g.run([Group("a", ["x"], True), Group("k", ["1", "2"], False)], join), ["a:x"])
        self.assertEqual(
            g.run([Group("k", ["3"], False), Group("k", ["4"], True), Group("m", ["5"], True)], join),
            ["k:1,2,3,4", "m:5"],
        )

    def test_a_key_without_its_last_group_is_an_error(self):
        g = mr_sdk._Gatherer()
        with self.assertRaises(ValueError):
            g.run([Group("p", ["1"], False), Group("q", ["2"], True)], lambda k, v: "")

    def test_combining_folds_a_key_at_each_group_that_is_not_its_last(self):
        g = mr_sdk._Gatherer(fold=True)
        seen = []
        total = lambda k, v: seen.append(list(v)) or str(sum(int(x) for x in v))
        self.assertEqual(g.run([Group("k", ["1", "2"], False)], total), [])
        self.assertEqual(g.run([Group("k", ["3"], False), Group("k", ["4"], True)], total), ["10"])
        self.assertEqual(seen, [["1", "2"], ["3", "3"], ["6", "4"]])

    def test_a_fold_takes_a_keys_values_as_they_arrive(self):
        # "a" over two calls and "b" folded; "c" reduced (`start` says no).
        seen = []

        class Sum:
            def __init__(self):
                self.n = 0

            def add(self, v):
                seen.append(v)
                self.n += int(v)

            def finish(self):
                return str(self.n)

        started = []
        start = lambda k: started.append(k) or (Sum() if k != "c" else None)
        join = lambda k, v: f"{k}:{','.join(v)}"
        g = mr_sdk._Gatherer()
        self.assertEqual(g.run([Group("a", ["1", "2"], False)], join, start), [])
        # Nothing piles up: the fold has the first values already.
        self.assertEqual(seen, ["1", "2"])
        out = g.run(
            [Group("a", ["3"], True), Group("b", ["4", "5"], True), Group("c", ["6", "7"], True)],
            join,
            start,
        )
        self.assertEqual(out, ["6", "9", "c:6,7"])
        self.assertEqual(started, ["a", "b", "c"])
        # A fold pending for one key when another arrives is an error.
        g.run([Group("p", ["1"], False)], join, start)
        with self.assertRaises(ValueError):
            g.run([Group("q", ["2"], True)], join, start)

    def test_the_default_reduce_uses_fold_and_neither_is_an_error(self):
        class Counter:
            def __init__(self):
                self.n = 0

            def add(self, v):
                self.n += 1

            def finish(self):
                return str(self.n)

        class Folding(mr_sdk.App):
            def fold(self, key):
                return Counter()

        self.assertEqual(Folding().reduce("k", ["x", "y"]), "2")
        with self.assertRaises(NotImplementedError):
            mr_sdk.App().reduce("k", ["x"])

    def test_none_stops_early(self):
        g = mr_sdk._Gatherer()
        self.assertIsNone(g.run([Group("a", ["1"], True)], lambda k, v: None))


COMPONENTIZE_PY = shutil.which("componentize-py", path=os.path.dirname(sys.executable))


@unittest.skipUnless(COMPONENTIZE_PY, "componentize-py is not next to this python (run it from the build's venv)")
class ExportTest(unittest.TestCase):
    """`export` against the real generated bindings, with a fake `emit`."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp()
        # The Python SDK is on the contract mr:app@0.1.2 (the host runs it).
        wit = os.path.join(os.path.dirname(__file__), "..", "..", "wit", "0.1")
        subprocess.run(
            [COMPONENTIZE_PY, "-d", wit, "-w", "mapreduce", "bindings", cls.dir],
            check=True,
            capture_output=True,
        )
        sys.path.insert(0, cls.dir)
        from wit_world.imports import host, types

        cls.host, cls.types = host, types

    @classmethod
    def tearDownClass(cls):
        sys.path.remove(cls.dir)
        shutil.rmtree(cls.dir)

    def world(self, app):
        return mr_sdk.export(app)()

    def test_map_reduce_and_combine_through_the_bindings(self):
        class Wc(mr_sdk.App):
            def map(self, input, contents, out):
                for w in mr_sdk.words(contents):
                    out.emit(w, "1")

            def reduce(self, key, values):
                return str(sum(int(v) for v in values))

            def combine(self, key, values):
                return self.reduce(key, values)

        emitted = Host()
        self.host.emit = emitted
        reports = []
        self.host.progress = lambda done, total: reports.append((done, total))
        w = self.world(Wc)
        w.map("in.txt", "a b a " * 10)
        self.assertEqual(sorted(emitted.pairs()), [("a", "20"), ("b", "10")])
        self.assertEqual(reports, [(60, 60)])
        # A long input: reports as `words` goes, at most PROGRESS_STEPS.
        reports.clear()
        text = "alpha beta gamma " * 200000
        w.map("in.txt", text)
        self.assertGreater(len(reports), 30)
        self.assertLessEqual(len(reports), mr_sdk.PROGRESS_STEPS + 1)
        self.assertEqual(reports[-1], (len(text), len(text)))
        self.assertTrue(all(a[0] < b[0] for a, b in zip(reports, reports[1:])))
        self.assertIsNone(mr_sdk._where)
        G = self.types.Group
        self.assertEqual(w.reduce([G("a", ["1", "2"], False)]), [])
        self.assertEqual(w.reduce([G("a", ["3"], True), G("b", ["4"], True)]), ["6", "4"])
        self.assertEqual(w.combine([G("a", ["1", "2"], True)]), ["3"])

    def test_a_fold_reduces_through_the_bindings_and_its_result_is_checked(self):
        from componentize_py_types import Err

        class Sum:
            def __init__(self, key):
                self.key, self.n = key, 0

            def add(self, v):
                self.n += int(v)

            def finish(self):
                return str(self.n) if self.key != "bad" else self.n

        class Folding(mr_sdk.App):
            def fold(self, key):
                return Sum(key)

        w = self.world(Folding)
        G = self.types.Group
        self.assertEqual(w.reduce([G("a", ["1", "2"], False)]), [])
        self.assertEqual(w.reduce([G("a", ["3"], True), G("b", ["4"], True)]), ["6", "4"])
        with self.assertRaises(Err) as e:
            w.reduce([G("bad", ["1"], True)])
        self.assertIn("fold's finish returned int for key 'bad', not str", e.exception.value)

    def test_counter_goes_to_the_hosts_counter_and_checks_its_arguments(self):
        counted = []
        self.host.counter = lambda name, delta: counted.append((name, delta))
        mr_sdk.counter("lines", 3)
        mr_sdk.counter("lines")
        self.assertEqual(counted, [("lines", 3), ("lines", 1)])
        with self.assertRaises(TypeError):
            mr_sdk.counter(7, 1)
        with self.assertRaises(TypeError):
            mr_sdk.counter("x", 1.5)
        with self.assertRaises(ValueError):
            mr_sdk.counter("x", 2**63)

    def test_no_combiner_is_none(self):
        class NoCombiner(mr_sdk.App):
            def reduce(self, key, values):
                return ""

        self.assertIsNone(self.world(NoCombiner).combine([self.types.Group("a", ["1", "2"], True)]))

    def test_an_exception_becomes_the_tasks_error_with_its_traceback(self):
        from componentize_py_types import Err

        class Broken(mr_sdk.App):
            def map(self, input, contents, out):
                raise KeyError("no such thing")

            def reduce(self, key, values):
                return 42  # not a str

        w = self.world(Broken)
        with self.assertRaises(Err) as e:
            w.map("in.txt", "x")
        self.assertIn("map of 'in.txt' failed", e.exception.value)
        self.assertIn("KeyError: 'no such thing'", e.exception.value)
        with self.assertRaises(Err) as e:
            w.reduce([self.types.Group("k", ["1"], True)])
        self.assertIn("reduce returned int for key 'k', not str", e.exception.value)


if __name__ == "__main__":
    unittest.main()
