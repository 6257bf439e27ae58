"""ingest.filters: `--where` read by PostgreSQL's grammar (pglast), checked against an allow-list, and written back.

What the attacks on a real server show is in tests/test_sql_security.py; here, what the checker accepts, what it
turns the text into (the SQL that runs), and what it costs.
"""
from __future__ import annotations

import statistics
import time

import pytest
from pglast import parse_sql

from ingest.errors import FilterError
from ingest.filters import SKELETON, Filter, check_where


@pytest.mark.parametrize("text, runs", [
    ("label = 'red'", "label = 'red'"),
    ("label = 'red' -- ) OR (true", "label = 'red'"),
    ("label = $$it's$$", "label = 'it''s'"),
    ("label = U&'\\0072ed'", "label = 'red'"),
    ("label = E'r\\\\ed'", "label = 'r\\ed'"),
    ("\"label\" IN ('a','b') AND width BETWEEN 10 AND 20", "label IN ('a', 'b') AND width BETWEEN 10 AND 20"),
    ("images.path ILIKE '%.JPG' AND label IS NOT NULL", "images.path ILIKE '%.JPG' AND label IS NOT NULL"),
    ("lower(label) = 'red'", "pg_catalog.lower(label) = 'red'"),
    ("trim(both from label) = 'red'", "pg_catalog.btrim(label) = 'red'"),
    ("extract(year from ingested_at) >= 2024", "pg_catalog.extract('year', ingested_at) >= 2024"),
    ("width::float / height > 1.5", "CAST(width AS double precision) / height > 1.5"),
    ("ingested_at > '2024-01-01'::timestamptz", "ingested_at > CAST('2024-01-01' AS timestamp with time zone)"),
    ("coalesce(label, '') <> '' AND NOT (bytes < 1000)", "COALESCE(label, '') <> '' AND NOT bytes < 1000"),
    ("CASE WHEN width > height THEN 'wide' ELSE 'tall' END = 'wide'", "CASE WHEN width > height THEN 'wide' ELSE 'tall' END = 'wide'"),
    ("id = ANY(ARRAY[1, 2, 3])", "id = ANY(ARRAY[1, 2, 3])"),
    ("path LIKE '%!_%' ESCAPE '!'", "path LIKE pg_catalog.like_escape('%!_%', '!')"),
])
def test_what_runs_is_the_checked_expression_written_back(text, runs):
    assert check_where(text) == runs
    # What runs parses to the tree that was checked (functions and types already pinned to pg_catalog).
    assert parse_sql(SKELETON + runs)[0].stmt.whereClause == parse_sql(SKELETON + check_where(runs))[0].stmt.whereClause


@pytest.mark.parametrize("text, says", [
    ("", "--where is empty"),
    ("true) OR (1=1", "is not a SQL condition: syntax error"),
    ("true ORDER BY 1", "no clauses"),
    ("true UNION SELECT 1 FROM images", "no clauses"),
    ("true GROUP BY 1", "no clauses"),
    ("id IN (SELECT id FROM images)", "may not contain a sub-select"),
    ("ARRAY(SELECT 1) IS NULL", "may not contain a sub-select"),
    ("collections.name = 'x'", "only columns of images"),
    ("other.images.id = 1", "only columns of images"),
    ("ctid IS NULL", "has no column 'ctid'"),
    ("$1 = 1", "may not contain a parameter"),
    ("label COLLATE \"C\" = 'a'", "may not contain COLLATE"),
    ("current_user = 'x'", "may not contain a session value"),
    ("(label).x = 1", "subscripts or field selection"),
    ("label OPERATOR(pg_catalog.=) 'x'", "may not use the operator pg_catalog.="),
    ("embedding <-> '[1,2]' < 1", "may not use the operator <->"),
    ("label::text[] IS NULL", "may not cast to text[]"),
    ("label::public.text = 'a'", "may not cast to public.text"),
    ("public.lower(label) = 'a'", "may not call public.lower()"),
    ("lower(DISTINCT label) = 'a'", "only as a plain function"),
    ("lower(label) FILTER (WHERE true) = 'a'", "only as a plain function"),
    ("ROW(1, 2) IS NULL", "may not contain a row constructor"),
])
def test_refusals_name_what_is_refused(text, says):
    with pytest.raises(FilterError) as refused:
        Filter.of(where=text)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_checking_costs_well_under_a_millisecond():
    text = "(label = 'red' OR label = 'blue') AND path LIKE '%_1.jpg' AND width > 10 AND lower(label) <> 'x'"
    timings = []
    for _ in range(200):
        started = time.perf_counter()
        check_where.__wrapped__(text)  # uncached: parse, check, write back, parse again and compare
        timings.append(time.perf_counter() - started)
    assert statistics.median(timings) < 0.0015, statistics.median(timings)
    started = time.perf_counter()
    for _ in range(1000):
        check_where(text)  # the same filter again (a web page's repeated query): cached
    assert (time.perf_counter() - started) / 1000 < 0.0001
