// The JavaScript SDK for `mr` apps: write an object with map/reduce/combine,
// export it, build it with componentize-js (see apps/wc-js).
//
//   import { emit, progress, counter } from 'mr:app/host@0.1.2';
//   import { exportApp, words } from './mr.js';
//
//   const wordCount = {
//     map(input, contents, out) {
//       for (const word of words(contents)) out.emit(word, '1');
//     },
//     reduce(key, values) {
//       let n = 0;
//       for (const v of values) n += Number(v);
//       return String(n);
//     },
//     combine(key, values) {
//       return this.reduce(key, values);
//     },
//   };
//
//   export const { map, reduce, combine } = exportApp(wordCount, emit, progress);
//
// What the SDK does for the app, as the Rust SDK does:
// - Batching: `out.emit` buffers pairs and hands them to the host in
//   arrays of up to 8192 pairs or 1 MiB.
// - Combining: when the app's `combine` returns a string (not undefined),
//   map output is combined inside the guest before it is emitted, in a
//   table of bounded size.
// - Progress: `words(contents)` tells the host how far into its input the
//   map is, as it goes (a few hundred `progress` calls per split), assuming
//   the map reads it once, in order; maps that read their input otherwise
//   call `out.progress(done, total)` (which turns the reports of `words`
//   off).
// - Streaming keys: the host may deliver a key with very many values in
//   several groups; the SDK gathers them and calls `reduce` once, or hands
//   them one at a time to the object the app's optional `fold(key)`
//   returns (its `add(value)`, then `finish()` for the output value), in
//   memory that does not grow with their number (an app implements
//   `reduce` or `fold`).
// - Errors: an exception in the app fails the task with its message and
//   stack.
//
// `emit` and `progress` are passed in (rather than imported here) so this module also runs
// under Node for its tests.

import { WORD } from './letters.js';

/** Pairs and bytes (UTF-16 units, near enough) buffered before one emit. */
export const BATCH_PAIRS = 8192;
export const BATCH_BYTES = 1 << 20;
/** Values of one key collected before the combiner folds them into one. */
export const COMBINE_AT = 8;
/** Estimated bytes the combining table may hold before it is flushed. */
export const TABLE_BYTES = 48 << 20;
/** Estimated bytes a table entry costs beyond its text. */
const ENTRY_OVERHEAD = 120;

/**
 * The words of `text` as the MIT 6.5840 lab splits them (Go's
 * `unicode.IsLetter`): maximal runs of Unicode letters (general category
 * L), case kept, with the Rust SDK's letter table. Iterates lazily.
 */
export function* words(text) {
  const re = new RegExp(WORD);
  // Words of the running map's own contents tell the host how far it is.
  const at = where !== null && text === where.text ? where : null;
  let m;
  while ((m = re.exec(text)) !== null) {
    if (at !== null && re.lastIndex >= at.next && !at.off) {
      at.next = re.lastIndex + at.step;
      at.report(re.lastIndex, text.length);
    }
    yield m[0];
  }
  if (at !== null && text.length > 0 && !at.off) at.report(text.length, text.length);
}

/** Progress reports per map call, at most (and at least 64 Ki units apart). */
export const PROGRESS_STEPS = 256;

const U64_MAX = (1n << 64n) - 1n;

/** A count as the host's u64 (a BigInt) clamped to its range; null if it is not a finite number. */
function u64(n) {
  let b;
  if (typeof n === 'bigint') {
    b = n;
  } else {
    const x = Math.floor(Number(n));
    if (!Number.isFinite(x)) return null;
    b = BigInt(x);
  }
  return b < 0n ? 0n : b > U64_MAX ? U64_MAX : b;
}

/** The running map's contents, and where `words` reports next. */
let where = null;

function startMap(text, report) {
  where = report
    ? { text, report, next: 0, step: Math.max(Math.floor(text.length / PROGRESS_STEPS), 1 << 16), off: false }
    : null;
}

/** Collects map output; see the module comment. */
export class Emitter {
  constructor(combine, emit, progress) {
    this._combine = combine;
    this._emit = emit;
    this._progress = progress;
    this._combining = undefined; // unknown until the combiner is first asked
    this._table = new Map();
    this._tableBytes = 0;
    this._batch = [];
    this._batchBytes = 0;
  }

  /** Emits one intermediate pair of strings. */
  emit(key, value) {
    if (this._combining === false) {
      this._push(key, value);
      return;
    }
    const values = this._table.get(key);
    if (values === undefined) {
      this._table.set(key, [value]);
      this._tableBytes += key.length + value.length + ENTRY_OVERHEAD;
      if (this._tableBytes >= TABLE_BYTES) this._flushTable();
      return;
    }
    values.push(value);
    if (values.length >= COMBINE_AT) {
      const combined = this._combine(key, values);
      if (combined === undefined || combined === null) {
        this._combining = false;
        this._flushTable();
        return;
      }
      this._combining = true;
      // A new array: truncating the old one in place measured slower in
      // the engine's interpreter.
      this._table.set(key, [combined]);
    }
  }

  /**
   * Tells the host that the map is `done` (characters, lines, any unit) of
   * `total` through its input: for maps that do not split their contents
   * with `words` (which reports by itself), or not in one pass in order.
   * The first call turns the reports of `words` off for the rest of the
   * map. Numbers are clamped to 0 .. 2^64 - 1; a call with something that
   * is not a finite number is ignored. A few hundred calls per map are
   * plenty; the host never moves progress back.
   */
  progress(done, total) {
    if (where !== null) where.off = true; // the app reports by itself
    const d = u64(done);
    const t = u64(total);
    if (this._progress && d !== null && t !== null) this._progress(d, t);
  }

  _push(key, value) {
    this._batch.push({ key, value });
    this._batchBytes += key.length + value.length;
    if (this._batch.length >= BATCH_PAIRS || this._batchBytes >= BATCH_BYTES) {
      this._flushBatch();
    }
  }

  _flushTable() {
    const table = this._table;
    this._table = new Map();
    this._tableBytes = 0;
    for (const [key, values] of table) {
      if (values.length > 1 && this._combining !== false) {
        const combined = this._combine(key, values);
        if (combined !== undefined && combined !== null) {
          this._combining = true;
          this._push(key, combined);
          continue;
        }
        this._combining = false;
      }
      for (const value of values) this._push(key, value);
    }
  }

  _flushBatch() {
    if (this._batch.length > 0) {
      this._emit(this._batch);
      this._batch = [];
      this._batchBytes = 0;
    }
  }

  /** Hands everything still held to the host (called after `map`). */
  finish() {
    this._flushTable();
    this._flushBatch();
  }
}

/**
 * Gathers groups (a key's values may come in several, all but the last with
 * `last: false`) into whole keys.
 */
export class Gatherer {
  /** `fold`: a combiner, which may run on any subset of a key's values;
   * a key's values so far are folded into one whenever a group of it is
   * not its last, so a long run does not pile up in the guest. */
  constructor(fold = false) {
    this._pending = null; // [key, values or a fold's state, is it a fold]
    this._fold = fold;
  }

  /** Calls `f(key, values)` once per whole key; returns the results, or
   * undefined as soon as `f` returns undefined. `start(key)`, for a key's
   * first group, may return a fold's state, which then takes the key's
   * values as they come (`add`) and gives its result (`finish`) instead. */
  run(groups, f, start = () => undefined) {
    const out = [];
    for (const g of groups) {
      let key = g.key;
      let values = g.values;
      let folding;
      if (this._pending !== null) {
        const [pkey, pvalues, isFold] = this._pending;
        if (pkey !== g.key) {
          throw new Error(`host protocol error: key ${JSON.stringify(pkey)} ended without its last group`);
        }
        this._pending = null;
        if (isFold) {
          folding = pvalues;
        } else {
          for (const v of values) pvalues.push(v);
          values = pvalues;
        }
      } else {
        folding = start(key);
      }
      if (folding !== undefined && folding !== null) {
        for (const v of g.values) folding.add(v);
        if (g.last) out.push(folding.finish());
        else this._pending = [key, folding, true];
        continue;
      }
      if (g.last) {
        const r = f(key, values);
        if (r === undefined || r === null) return undefined;
        out.push(r);
      } else {
        let kept = Array.from(values);
        if (this._fold && kept.length > 1) {
          const r = f(key, kept);
          if (r === undefined || r === null) return undefined;
          kept = [r];
        }
        this._pending = [key, kept, false];
      }
    }
    return out;
  }
}

function failure(what, e) {
  const detail = e instanceof Error ? `${e}\n${e.stack ?? ''}` : String(e);
  return `${what} failed: ${detail}`;
}

/**
 * The component's exports for `app` ({ map(input, contents, out),
 * reduce(key, values) or fold(key), combine?(key, values) }); `emit` and `progress`
 * are the host's, imported from 'mr:app/host@0.1.2' (`progress` is
 * optional: without it the host hears nothing of how far a map is). An app
 * counts with the host's `counter(name, delta)` (delta a BigInt), imported
 * from there too: the job's report sums it over committed attempts.
 * Export its `map`, `reduce` and `combine` from the app's module.
 */
export function exportApp(app, emit, progress) {
  const combine = app.combine ? (k, v) => app.combine(k, v) : () => undefined;
  const reducing = new Gatherer();
  const combining = new Gatherer(true);
  const checked = (what, key, r) => {
    if (typeof r !== 'string') {
      throw new TypeError(`${what} returned ${typeof r} for key ${JSON.stringify(key)}, not a string`);
    }
    return r;
  };
  const startFold = (key) => (app.fold ? app.fold(key) : undefined);
  const reduceOne = (key, values) => {
    if (!app.reduce) {
      // The app folds: the default reduce hands the values to its fold.
      const state = startFold(key);
      if (state === undefined || state === null) {
        throw new Error('the app implements neither reduce nor fold');
      }
      for (const v of values) state.add(v);
      return checked("fold's finish", key, state.finish());
    }
    return checked('reduce', key, app.reduce(key, values));
  };
  const foldOne = (key) => {
    const state = startFold(key);
    if (state === undefined || state === null) return undefined;
    return { add: (v) => state.add(v), finish: () => checked("fold's finish", key, state.finish()) };
  };
  return {
    map(input, contents) {
      const report = progress ? (done, total) => progress(u64(done), u64(total)) : null;
      try {
        startMap(contents, report);
        const out = new Emitter(combine, emit, progress);
        app.map(input, contents, out);
        out.finish();
      } catch (e) {
        throw failure(`map of ${JSON.stringify(input)}`, e);
      } finally {
        startMap('', null);
      }
    },
    reduce(groups) {
      try {
        return reducing.run(groups, reduceOne, foldOne);
      } catch (e) {
        throw failure('reduce', e);
      }
    },
    combine(groups) {
      try {
        return combining.run(groups, combine);
      } catch (e) {
        throw failure('combine', e);
      }
    },
  };
}
