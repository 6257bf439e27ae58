"""reverse-image-search, read path: a query image -> the same vector as stored -> nearest images."""

ENGINES = ("pgvector", "annoy")  # exact SQL, fast approximate file
