"""Word count in DuckDB, for mr's benchmark: the same words as mr's wc (maximal
runs of Unicode letters, general category L, case kept), counted with
regexp_split_to_array and GROUP BY, written as `word count` lines.

    python wc.py THREADS OUTPUT INPUT...
"""
import sys

import duckdb


def main():
    threads, output, inputs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    con = duckdb.connect()
    con.execute(f"SET threads TO {threads}")
    con.execute("SET preserve_insertion_order = false")
    # One row per line (a CSV reader with a delimiter no text has, so
    # DuckDB reads and splits in parallel), split at every run of
    # non-letters.
    con.execute(
        """
        COPY (
            SELECT word, count(*) AS n
            FROM (
                SELECT unnest(regexp_split_to_array(line, '[^\\p{L}]+')) AS word
                FROM read_csv(?, columns = {'line': 'VARCHAR'}, delim = '\x01',
                              quote = '', escape = '', header = false,
                              auto_detect = false, null_padding = true)
            )
            WHERE word <> ''
            GROUP BY word
        ) TO '"""
        + output.replace("'", "''")
        + """' (FORMAT csv, DELIMITER ' ', HEADER false, QUOTE '')
        """,
        [inputs],
    )


if __name__ == "__main__":
    main()
