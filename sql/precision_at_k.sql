-- Leave-one-out precision@k, of the whole collection and of each label: every labelled image in
-- turn is the query, its k nearest OTHER images of the collection (euclidean <->) are the answer,
-- and the share of them with the query's label is its precision. The first row, label '(all)', is
-- the mean over all queries; then one row per label, the worst label first.
--
-- Answers: how well does the search find pictures of the same label, and which labels does it
-- confuse? Compare with `chance`, what a random ranking would get: for a query,
-- (images of its label - 1) / (images - 1), averaged like the precision.
-- Unlabelled images are not queries; as neighbours they count as misses. In a collection with k or
-- fewer images a query has fewer than k neighbours, and its precision is over those.
-- Ties in distance are broken by id. Runs one exact k-NN query per image (a LATERAL join), so it
-- takes a while on large collections.
--
-- Parameters: edit the params line (collection name; k).
-- Run: search sql -f sql/precision_at_k.sql
WITH params AS (
    SELECT 'caltech101' AS collection, 5 AS k  -- <- edit
),
coll AS (
    SELECT i.id, i.label, i.embedding
    FROM params p
    JOIN collections c ON c.name = p.collection
    JOIN images i ON i.collection_id = c.id
    WHERE i.embedding IS NOT NULL
),
per_query AS (
    SELECT q.id,
           q.label,
           avg((n.label IS NOT DISTINCT FROM q.label)::int) AS precision,
           ((SELECT count(*) FROM coll o WHERE o.label = q.label) - 1)::numeric
               / nullif((SELECT count(*) FROM coll) - 1, 0) AS chance
    FROM coll q
    CROSS JOIN LATERAL (
        -- The k nearest other images of the query: the k-NN search with the query left out.
        SELECT o.label
        FROM coll o
        WHERE o.id <> q.id
        ORDER BY o.embedding <-> q.embedding, o.id
        LIMIT (SELECT k FROM params)
    ) n
    WHERE q.label IS NOT NULL
    GROUP BY q.id, q.label
)
SELECT CASE WHEN grouping(pq.label) = 1 THEN '(all)' ELSE pq.label END AS label,
       (SELECT k FROM params) AS k,
       count(*) AS queries,
       avg(pq.precision)::float8 AS precision_at_k,
       avg(pq.chance)::float8 AS chance
FROM per_query pq
GROUP BY ROLLUP (pq.label)
ORDER BY grouping(pq.label) DESC, precision_at_k, pq.label
