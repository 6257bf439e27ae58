-- Pictures held by several files (identical bytes), with every path, the most copies first.
--
-- Answers: which files are exact copies of one another, and where does each copy live? A picture is
-- stored and embedded once per collection (by sha256); table image_paths lists every file that holds
-- it, and images.path is the one searches show. Near-duplicates (resized, re-encoded) are different
-- bytes, so different images: see sql/near_duplicates.sql, or `search duplicates` for both at once.
--
-- Parameters: edit the params line (the collection's name).
-- Run: search sql -f sql/duplicate_files.sql
WITH params AS (
    SELECT 'caltech101' AS collection  -- <- edit: collection name
)
SELECT i.id,
       i.label,
       count(*) AS files,
       array_agg(f.path ORDER BY f.path) AS paths,
       i.path AS shown
FROM params p
JOIN collections c ON c.name = p.collection
JOIN images i ON i.collection_id = c.id
JOIN image_paths f ON f.collection_id = i.collection_id AND f.sha256 = i.sha256
GROUP BY i.collection_id, i.sha256
HAVING count(*) > 1
ORDER BY files DESC, i.id
