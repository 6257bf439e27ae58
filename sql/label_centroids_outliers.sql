-- Each label's centroid (the mean embedding of its images) and the label's outliers: the images
-- farthest from their own label's centroid.
--
-- Answers: which pictures look least like the rest of their label? Often mislabelled or odd shots;
-- compare an outlier's distance with label_mean_distance, the typical distance in that label.
-- One row per outlier, `outliers` rows per label (fewer if the label has fewer images), the farthest
-- first; the centroid is repeated on each row of its label, as an array of floats (leave the last
-- column out for a narrower table).
-- Unlabelled images have no label centroid and are left out.
--
-- Parameters: edit the params line (collection name; how many outliers to show per label).
-- Run: search sql -f sql/label_centroids_outliers.sql
WITH params AS (
    SELECT 'caltech101' AS collection, 3 AS outliers  -- <- edit
),
labelled AS (
    SELECT i.id, i.label, i.path, i.embedding
    FROM params p
    JOIN collections c ON c.name = p.collection
    JOIN images i ON i.collection_id = c.id
    WHERE i.label IS NOT NULL AND i.embedding IS NOT NULL
),
centroids AS (
    SELECT label, count(*) AS label_images, avg(embedding) AS centroid
    FROM labelled
    GROUP BY label
),
ranked AS (
    SELECT l.label, l.id, l.path, c.label_images, c.centroid,
           l.embedding <-> c.centroid AS distance,
           avg(l.embedding <-> c.centroid) OVER (PARTITION BY l.label) AS label_mean_distance,
           row_number() OVER (PARTITION BY l.label ORDER BY l.embedding <-> c.centroid DESC, l.id) AS outlier_rank
    FROM labelled l
    JOIN centroids c ON c.label = l.label
)
SELECT r.label,
       r.label_images,
       r.label_mean_distance,
       r.outlier_rank,
       r.id,
       r.distance,
       r.path,
       r.centroid::real[] AS centroid
FROM ranked r
WHERE r.outlier_rank <= (SELECT outliers FROM params)
ORDER BY r.label, r.outlier_rank
