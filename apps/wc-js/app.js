// Word count: for every word (maximal run of Unicode letters, case kept),
// the number of times it occurs. Same output as apps/wc (Rust) and the MIT
// 6.5840 lab's wc.go.
import { emit, progress, counter } from 'mr:app/host@0.1.2';
import { exportApp, words } from '../../guest-sdk/js/mr.js';

const wordCount = {
  map(input, contents, out) {
    counter('maps', 1n); // the app's own counter, summed in the job's report
    for (const word of words(contents)) out.emit(word, '1');
  },

  reduce(key, values) {
    let total = 0;
    for (const v of values) total += Number(v);
    return String(total);
  },

  // The combiner (run on map output before the shuffle) is the reduce.
  combine(key, values) {
    return this.reduce(key, values);
  },
};

export const { map, reduce, combine } = exportApp(wordCount, emit, progress);
