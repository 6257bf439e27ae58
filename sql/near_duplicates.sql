-- Near-duplicate pairs in one collection: every two images whose embeddings are closer than a
-- threshold, the closest pair first.
--
-- Answers: which pictures are (almost) the same one stored twice? Byte-identical files are already
-- stored once per collection (by sha256; sql/duplicate_files.sql lists their paths), so what is left
-- here is re-encodings, resizes, crops and true look-alikes. Pairs whose labels differ (same_label false) are worth a look first.
--
-- Parameters: edit the params line.
--   collection    the collection's name;
--   max_distance  the threshold on the euclidean distance (<->). Distances depend on the collection
--                 and its PCA dims: look at rank 2 of sql/nearest_neighbours.sql for typical
--                 values, start small and raise it.
-- Every pair is compared, so the cost grows with the square of the collection's size: fine for
-- thousands of images, slow for millions.
-- Run: search sql -f sql/near_duplicates.sql
WITH params AS (
    SELECT 'caltech101' AS collection, 0.05::float8 AS max_distance  -- <- edit
),
coll AS (
    SELECT i.id, i.label, i.path, i.embedding
    FROM params p
    JOIN collections c ON c.name = p.collection
    JOIN images i ON i.collection_id = c.id
    WHERE i.embedding IS NOT NULL
)
SELECT a.id AS id_a,
       b.id AS id_b,
       a.embedding <-> b.embedding AS distance,
       a.label IS NOT DISTINCT FROM b.label AS same_label,
       a.label AS label_a,
       b.label AS label_b,
       a.path AS path_a,
       b.path AS path_b
FROM coll a
JOIN coll b ON a.id < b.id
WHERE a.embedding <-> b.embedding < (SELECT max_distance FROM params)
ORDER BY distance, id_a, id_b
