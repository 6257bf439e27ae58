"""`search sql` output: --json that a strict parser accepts, the --max-rows cap (its note on stderr, so stdout stays
valid JSON), and rows streamed through a server-side cursor with flat client memory, measured in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from search.cli import cli as search_cli


def strict(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, which Python's parser accepts by default."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def sql(*args: str):
    return CliRunner().invoke(search_cli, ["sql", *args])


def test_json_is_strict_json(db):
    result = sql("SELECT 'NaN'::float8 AS nan, 'Infinity'::float8 AS inf, '-Infinity'::float4 AS ninf, "
                 "'NaN'::numeric AS nnan, 'Infinity'::numeric AS ninf2, 1.5::numeric AS dec, '\\x00ff10'::bytea AS raw, "
                 "ARRAY['NaN'::float8, 2] AS arr, '{\"a\": [1, null]}'::jsonb AS doc, 'é\"\\' AS text", "--json")
    assert result.exit_code == 0, result.output
    assert strict(result.stdout) == [{"nan": None, "inf": None, "ninf": None, "nnan": None, "ninf2": None, "dec": 1.5,
                                      "raw": "\\x00ff10", "arr": [None, 2.0], "doc": {"a": [1, None]}, "text": 'é"\\'}]


def test_table_shows_bytea_as_hex(db):
    result = sql("SELECT '\\x00ff'::bytea AS raw, NULL AS nothing, 'a\nb' AS two_lines")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["raw     nothing  two_lines", "------  -------  ---------", "\\x00ff           a\\nb"]


def test_max_rows_cuts_the_output_and_says_so_on_stderr(db):
    query = "SELECT g FROM generate_series(1, {n}) g"
    cut = sql(query.format(n=25), "--max-rows", "10", "--json")
    assert cut.exit_code == 0 and [r["g"] for r in strict(cut.stdout)] == list(range(1, 11))
    assert "printed the first 10 rows" in cut.stderr and "--max-rows 0" in cut.stderr
    exact = sql(query.format(n=10), "--max-rows", "10", "--json")
    assert len(strict(exact.stdout)) == 10 and exact.stderr == ""
    default = sql(query.format(n=10_005))
    assert len(default.stdout.splitlines()) == 2 + 10_000 and "printed the first 10000 rows" in default.stderr
    everything = sql(query.format(n=10_005), "--max-rows", "0", "--json")
    assert len(strict(everything.stdout)) == 10_005 and everything.stderr == ""
    assert strict(sql("SELECT 1 AS a WHERE false", "--json").stdout) == []


def test_statements_that_are_not_queries_still_answer(db):
    """EXPLAIN and SHOW cannot go through a cursor; they run as one prepared statement instead."""
    assert strict(sql("SHOW standard_conforming_strings", "--json").stdout) == [{"standard_conforming_strings": "on"}]
    assert "Seq Scan on images" in sql("EXPLAIN SELECT * FROM images").stdout


def rss_mb(rows: int, *options: str) -> float:
    """Peak resident memory of a `search sql` process printing `rows` generated rows to /dev/null."""
    code = (
        "import resource, sys\n"
        "from search.cli import cli\n"
        f"query = 'SELECT g, md5(g::text) AS h, g * 0.5 AS half FROM generate_series(1, {rows}) g'\n"
        "try:\n"
        f"    cli(['sql', query, '--max-rows', '0', *{list(options)!r}])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    return float(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("options, rows", [((), 2_000_000), (("--json",), 500_000)])
def test_memory_stays_flat_while_rows_stream(db, options, rows):
    """Millions of rows cost no more client memory than a few thousand: they are fetched and written in batches."""
    small, large = rss_mb(5_000, *options), rss_mb(rows, *options)
    assert large - small < 25, (small, large)
