-- The k nearest neighbours of one stored image: the images of its collection whose embeddings are
-- closest to its own in euclidean distance (pgvector's <->, the distance `search similar` uses).
--
-- Answers: what does the search return for this image? It is the SQL of `search similar --id N`.
-- The image itself comes first, at distance 0; to leave it out, add `AND i.id <> q.id` to the WHERE
-- of `hits`. Ties in distance are broken by id.
--
-- Parameters: edit the params line.
--   collection  used only to choose the default image: the smallest id of that collection;
--   image_id    an image id (from any collection; its neighbours come from its own collection),
--               or NULL for that default;
--   k           how many neighbours, the image itself included.
-- Run: search sql -f sql/nearest_neighbours.sql
WITH params AS (
    SELECT 'caltech101' AS collection, NULL::bigint AS image_id, 10 AS k  -- <- edit
),
q AS (
    SELECT i.id, i.collection_id, i.embedding
    FROM images i
    WHERE i.id = coalesce(
        (SELECT image_id FROM params),
        (SELECT min(i2.id)
         FROM params p
         JOIN collections c ON c.name = p.collection
         JOIN images i2 ON i2.collection_id = c.id
         WHERE i2.embedding IS NOT NULL))
),
hits AS (
    -- The plain k-NN query: ORDER BY embedding <-> (the query vector) LIMIT k.
    SELECT i.id, i.label, i.path, i.embedding <-> (SELECT embedding FROM q) AS distance
    FROM images i
    WHERE i.collection_id = (SELECT collection_id FROM q)
      AND i.embedding IS NOT NULL
    ORDER BY i.embedding <-> (SELECT embedding FROM q), i.id
    LIMIT (SELECT k FROM params)
)
SELECT row_number() OVER (ORDER BY h.distance, h.id) AS rank,
       (SELECT id FROM q) AS query_id,
       h.id,
       h.distance,
       h.label,
       h.path
FROM hits h
ORDER BY rank
