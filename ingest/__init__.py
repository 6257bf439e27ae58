"""reverse-image-search, write path: images -> ResNet50 features -> PCA -> PostgreSQL/pgvector -> Annoy."""
