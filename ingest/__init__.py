"""reverse-image-search's library: images -> ResNet50 features -> PCA -> PostgreSQL/pgvector -> Annoy, and back.

`ingest` is the write path and the core both paths share; `search` (the read path) imports only the names
listed in __all__ here, plus `ingest.errors`. Names load on first use, so `search --help` stays instant.
"""
from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    # a collection and what searching it returns
    "Collection": "ingest.collection",
    "Query": "ingest.collection",
    "Hit": "ingest.engines",
    # the engines that answer: one interface, registered by name, with query-time knobs given per query
    "Engine": "ingest.engines",
    "EngineName": "ingest.engines",
    "ENGINES": "ingest.engines",
    "QueryArgs": "ingest.engines",
    # queries made of a region of a picture, of several pictures, of more-like-this / less-like-that feedback
    "compose": "ingest.queries",
    "ComposedQuery": "ingest.queries",
    "Crop": "ingest.queries",
    "Picture": "ingest.queries",
    "pictures_of": "ingest.queries",
    "rocchio": "ingest.queries",
    "MAX_PICTURES": "ingest.queries",
    # configuration and the database
    "Settings": "ingest.config",
    "Database": "ingest.db",
    "connect": "ingest.db",
    "connect_for_queries": "ingest.db",
    "survive_restarts": "ingest.db",
    "reading": "ingest.reader",
    "limit_statements": "ingest.reader",
    # what is stored: a picture's details, and counts of a collection's pictures
    "ImageDetails": "ingest.store",
    "count_searchable": "ingest.counts",
    "label_counts": "ingest.counts",
    # where pictures live: every file holding each image (duplicates)
    "identical_files": "ingest.image_paths",
    "paths_of": "ingest.image_paths",
    # the largest picture ingest decodes, the process-wide budget of pixels decoded at once (`with decoding(w * h):`),
    # the largest file read, and how any picture becomes RGB (the web server's uploads and thumbnails)
    "MAX_PIXELS": "ingest.images",
    "INPUT_SIZE": "ingest.images",
    "DecodeBudget": "ingest.images",
    "decode_budget": "ingest.images",
    "decoding": "ingest.images",
    "decode_image": "ingest.images",
    "draft_size": "ingest.images",
    "read_file": "ingest.images",
    "file_size_limit": "ingest.images",
    "to_rgb": "ingest.images",
    # vectors and fine-tuning runs, for reports
    "normalize": "ingest.reduce",
    "holdout_hashes": "ingest.splits",
    "finetune_runs": "ingest.splits",
    "split_by_hash": "ingest.splits",
    # the command-line pieces both commands share
    "ErrorHandlingGroup": "ingest.options",
    "collection_option": "ingest.options",
    "database_option": "ingest.options",
    "json_option": "ingest.options",
    "timeout_option": "ingest.options",
    "read_url_option": "ingest.options",
    "reader_url_option": "ingest.options",
    "runtime_option": "ingest.options",
    "open_database": "ingest.options",
    "print_json": "ingest.options",
    "to_json": "ingest.options",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ingest' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
