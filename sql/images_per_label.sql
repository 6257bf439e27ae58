-- Images per label in one collection, the most common label first.
--
-- Answers: how many pictures does each label have, and how balanced is the collection?
-- Images stored without a label (directly in the loaded folder's root) are counted under label NULL.
--
-- Parameters: edit the params line (the collection's name).
-- Run: search sql -f sql/images_per_label.sql
WITH params AS (
    SELECT 'caltech101' AS collection  -- <- edit: collection name
)
SELECT i.label,
       count(*) AS images,
       round(100.0 * count(*) / sum(count(*)) OVER (), 2)::float8 AS percent
FROM params p
JOIN collections c ON c.name = p.collection
JOIN images i ON i.collection_id = c.id
GROUP BY i.label
ORDER BY images DESC, i.label
