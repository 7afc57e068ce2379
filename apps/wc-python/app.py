"""Word count: for every word (maximal run of Unicode letters, case kept),
the number of times it occurs. Same output as apps/wc (Rust) and the MIT
6.5840 lab's wc.go."""

import mr_sdk


class WordCount(mr_sdk.App):
    def map(self, input, contents, out):
        mr_sdk.counter("maps", 1)  # the app's own counter, summed in the job's report
        for word in mr_sdk.words(contents):
            out.emit(word, "1")

    def reduce(self, key, values):
        return str(sum(int(v) for v in values))

    # The combiner (run on map output before the shuffle) is the reduce.
    def combine(self, key, values):
        return self.reduce(key, values)


WitWorld = mr_sdk.export(WordCount)
