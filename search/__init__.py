"""reverse-image-search, read path: a query image -> the same vector as stored -> nearest images, SQL and reports."""
