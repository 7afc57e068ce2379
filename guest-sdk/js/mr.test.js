// Unit tests of the JavaScript SDK, run natively by Node's test runner:
//   node --test guest-sdk/js/   (tests/all/languages.rs runs it)
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { Emitter, Gatherer, PROGRESS_STEPS, exportApp, words } from './mr.js';

function fakeHost() {
  const batches = [];
  const emit = (batch) => batches.push(batch.map(({ key, value }) => [key, value]));
  const pairs = () => batches.flat();
  return { batches, emit, pairs };
}

const sum = (calls) => (key, values) => {
  calls.push(values.length);
  return String(values.reduce((a, v) => a + Number(v), 0));
};

test('words are runs of letters', () => {
  // 'Ⅻ' (U+216B) is a letter number, not a letter; U+FFFD is not a letter;
  // astral letters (U+10000, U+1E5D0) count.
  const text = "Hello, wörld! it's 42x--ǅ Ⅻ\ufffda b\u{10000} \u{1e5d0}.";
  assert.deepEqual([...words(text)], ['Hello', 'wörld', 'it', 's', 'x', 'ǅ', 'a', 'b\u{10000}', '\u{1e5d0}']);
  assert.deepEqual([...words('')], []);
  // Iterators are independent.
  const a = words('x y');
  const b = words('z');
  assert.equal(a.next().value, 'x');
  assert.equal(b.next().value, 'z');
  assert.equal(a.next().value, 'y');
});

test('without a combiner pairs go out raw in bounded batches', () => {
  const host = fakeHost();
  const out = new Emitter(() => undefined, host.emit);
  for (let i = 0; i < 10000; i++) out.emit(`k${i % 7}`, '1');
  out.finish();
  assert.equal(host.pairs().length, 10000);
  assert.deepEqual(host.batches.map((b) => b.length), [8192, 1808]);
});

test('a batch is cut at a mebibyte', () => {
  const host = fakeHost();
  const out = new Emitter(() => undefined, host.emit);
  for (let i = 0; i < 5; i++) out.emit('big', 'v'.repeat(600 << 10));
  out.finish();
  assert.deepEqual(host.batches.map((b) => b.length), [2, 2, 1]);
});

test('combining folds every eight values and at the end', () => {
  const host = fakeHost();
  const calls = [];
  const out = new Emitter(sum(calls), host.emit);
  for (let i = 0; i < 20; i++) out.emit('a', '1');
  out.emit('b', '5');
  out.emit('', '2');
  out.emit('', '3');
  out.finish();
  assert.deepEqual(host.pairs().sort(), [['', '5'], ['a', '20'], ['b', '5']]);
  assert.deepEqual(calls, [8, 8, 6, 2]);
});

test('no combiner found late loses nothing', () => {
  const host = fakeHost();
  const out = new Emitter(() => undefined, host.emit);
  for (let i = 0; i < 50; i++) {
    out.emit('x', String(i));
    out.emit(`y${i}`, '1');
  }
  out.finish();
  const xs = host.pairs().filter(([k]) => k === 'x').map(([, v]) => Number(v)).sort((p, q) => p - q);
  assert.deepEqual(xs, [...Array(50).keys()]);
  assert.equal(host.pairs().length, 100);
});

test('split groups are gathered into one call', () => {
  const g = new Gatherer();
  const join = (k, v) => `${k}:${v.join(',')}`;
  assert.deepEqual(g.run([{ key: 'a', values: ['x'], last: true }, { key: 'k', values: ['1', '2'], last: false }], join), ['a:x']);
  assert.deepEqual(
    g.run(
      [
        { key: 'k', values: ['3'], last: false },
        { key: 'k', values: ['4'], last: true },
        { key: 'm', values: ['5'], last: true },
      ],
      join,
    ),
    ['k:1,2,3,4', 'm:5'],
  );
  assert.throws(() => new Gatherer().run([{ key: 'p', values: [], last: false }, { key: 'q', values: [], last: true }], join), /protocol error/);
});

test('combining folds a key at each group that is not its last', () => {
  const g = new Gatherer(true);
  const seen = [];
  const total = (k, v) => {
    seen.push([...v]);
    return String(v.reduce((a, x) => a + Number(x), 0));
  };
  assert.deepEqual(g.run([{ key: 'k', values: ['1', '2'], last: false }], total), []);
  assert.deepEqual(
    g.run(
      [
        { key: 'k', values: ['3'], last: false },
        { key: 'k', values: ['4'], last: true },
      ],
      total,
    ),
    ['10'],
  );
  assert.deepEqual(seen, [['1', '2'], ['3', '3'], ['6', '4']]);
});

test('a fold takes a key\'s values as they arrive, across calls', () => {
  const host = fakeHost();
  const seen = [];
  const folding = {
    map() {},
    fold(key) {
      if (key === 'none') return undefined;
      let n = 0;
      return {
        add(v) {
          seen.push(v);
          n += Number(v);
        },
        finish: () => (key === 'num' ? n : String(n)),
      };
    },
  };
  const app = exportApp(folding, host.emit);
  assert.deepEqual(app.reduce([{ key: 'a', values: ['1', '2'], last: false }]), []);
  // Nothing piles up: the fold has the first values already.
  assert.deepEqual(seen, ['1', '2']);
  assert.deepEqual(
    app.reduce([
      { key: 'a', values: ['3'], last: true },
      { key: 'b', values: ['4', '5'], last: true },
    ]),
    ['6', '9'],
  );
  assert.throws(() => app.reduce([{ key: 'num', values: ['1'], last: true }]), (e) => e.includes("fold's finish returned number"));
  // No fold for a key and no reduce: an error that says so.
  assert.throws(() => app.reduce([{ key: 'none', values: ['1'], last: true }]), (e) => e.includes('neither reduce nor fold'));
});

test('exportApp wires map, reduce and combine, and turns exceptions into messages', () => {
  const host = fakeHost();
  const wc = {
    map(input, contents, out) {
      if (input === 'bad') throw new RangeError('no such thing');
      for (const w of words(contents)) out.emit(w, '1');
    },
    reduce(key, values) {
      return key === 'num' ? 42 : String(values.reduce((a, v) => a + Number(v), 0));
    },
    combine(key, values) {
      return this.reduce(key, values);
    },
  };
  const app = exportApp(wc, host.emit);
  app.map('in.txt', 'a b a '.repeat(10));
  assert.deepEqual(host.pairs().sort(), [['a', '20'], ['b', '10']]);
  assert.deepEqual(app.reduce([{ key: 'a', values: ['1', '2'], last: false }]), []);
  assert.deepEqual(app.reduce([{ key: 'a', values: ['3'], last: true }]), ['6']);
  assert.deepEqual(app.combine([{ key: 'a', values: ['1', '2'], last: true }]), ['3']);
  assert.throws(() => app.map('bad', ''), (e) => typeof e === 'string' && e.includes('map of "bad" failed: RangeError: no such thing'));
  assert.throws(() => app.reduce([{ key: 'num', values: [], last: true }]), (e) => e.includes('reduce returned number for key "num"'));
  const noCombiner = exportApp({ map() {}, reduce: () => '' }, host.emit);
  assert.equal(noCombiner.combine([{ key: 'a', values: ['1', '2'], last: true }]), undefined);
});

test('words of the map contents report how far it is; other text does not', () => {
  const reports = [];
  const progress = (done, total) => reports.push([done, total]);
  const text = 'alpha beta gamma '.repeat(200000);
  const { map } = exportApp(
    { map: (input, contents, out) => { for (const w of words(contents)) out.emit(w, '1'); }, reduce: () => '' },
    () => {},
    progress,
  );
  map('in.txt', text);
  const n = BigInt(text.length);
  assert.ok(reports.length > 30 && reports.length <= PROGRESS_STEPS + 1, `${reports.length}`);
  assert.ok(reports.every(([, t]) => t === n));
  assert.ok(reports.every(([d], i) => i === 0 || d > reports[i - 1][0]));
  assert.deepEqual(reports.at(-1), [n, n]);
  reports.length = 0;
  // After the map: nothing.
  for (const _ of words(text)) { /* no report */ }
  assert.equal(reports.length, 0);
  const out = new Emitter(() => undefined, () => {}, progress);
  out.progress(3, 4.5);
  assert.deepEqual(reports, [[3n, 4n]]);
});

test('words of other text report nothing while a map runs; the app\'s own report turns words off', () => {
  const reports = [];
  const progress = (done, total) => reports.push([done, total]);
  const text = 'alpha beta gamma '.repeat(200000);
  const other = 'delta epsilon '.repeat(200000);
  let phase;
  const { map } = exportApp(
    {
      map: (input, contents, out) => {
        for (const w of words(other)) out.emit(w, '1');
        phase = reports.length;
        if (input === 'own') out.progress(1, 3);
        for (const w of words(contents)) out.emit(w, '1');
      },
      reduce: () => '',
    },
    () => {},
    progress,
  );
  map('words', text);
  assert.equal(phase, 0);
  assert.ok(reports.length > 30, `${reports.length}`);
  reports.length = 0;
  map('own', text);
  assert.deepEqual(reports, [[1n, 3n]]);
});

test('progress is clamped to a u64 and what is not a finite number is ignored', () => {
  const reports = [];
  const out = new Emitter(() => undefined, () => {}, (done, total) => reports.push([done, total]));
  out.progress(-5, 2 ** 70);
  out.progress(NaN, 10);
  out.progress(1, Infinity);
  out.progress(2n, 1n << 70n);
  assert.deepEqual(reports, [[0n, (1n << 64n) - 1n], [2n, (1n << 64n) - 1n]]);
});
