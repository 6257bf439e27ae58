"""The tables, as SQLAlchemy models: the single source of truth that the Alembic migrations follow.

Users write SQL against these names (see sql/), so they are part of the interface:
collections, images (with `embedding`, the PCA-reduced vector searched with `<->`),
features (the raw 2048-d ResNet50 vector of each image, half precision), image_paths (every file holding each image)
and ingest_failures.
"""
from __future__ import annotations

from datetime import datetime

from pgvector.sqlalchemy import HALFVEC, Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    Index,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false as sa_false,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ingest.features import RAW_DIMS

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Collection(Base):
    """A named set of images embedded by one model with one set of weights, and the PCA that reduces them."""

    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    model: Mapped[str] = mapped_column(Text)
    weights: Mapped[str] = mapped_column(Text)
    weights_fingerprint: Mapped[str] = mapped_column(String(64))
    pca_dims: Mapped[int] = mapped_column(Integer)
    pca_version: Mapped[int] = mapped_column(Integer, server_default="0")
    pca_mean: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    pca_components: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    pca_explained_variance: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Bumped by each transaction that writes embeddings (holding this row): Annoy files record the value they
    # were built at, and rows with a higher images.embedding_seq are their delta (ingest/engines.py).
    embedding_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    removed_rows: Mapped[int] = mapped_column(BigInteger, server_default="0")  # rows ever removed
    hnsw: Mapped[bool] = mapped_column(Boolean, server_default=sa_false())  # keep a pgvector HNSW index
    precision: Mapped[str] = mapped_column(Text, server_default="fp32")  # 'fp32' or 'bf16': how the CNN ran
    runtime: Mapped[str] = mapped_column(Text, server_default="tensorflow")  # 'openvino' or 'tensorflow': what ran it
    raw_features: Mapped[str] = mapped_column(Text, server_default="half")  # 'half': kept; 'none': gone once PCA is fitted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Image(Base):
    """One picture of a collection, keyed by its content within the collection (collection_id, sha256): the key the
    tables are partitioned (by collection) and can be distributed (by sha256) on, docs/storage.md. `id` is the number
    users see; it comes from one sequence. `embedding` is NULL only until the collection's PCA is fitted."""

    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_collection_id_id", "collection_id", "id"),
        Index("ix_images_collection_id_embedding_seq", "collection_id", "embedding_seq"),
        Index("ix_images_collection_id_label", "collection_id", "label"),
        {"postgresql_partition_by": "LIST (collection_id)"},
    )

    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, server_default=text("nextval('images_id_seq')"))
    path: Mapped[str] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Text, nullable=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # No fixed dimension: each collection has its own PCA dims (collections.pca_dims).
    embedding = mapped_column(Vector(), nullable=True)
    embedding_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")  # the collections.embedding_seq that wrote it


def picture_key() -> ForeignKeyConstraint:
    """A row about a picture belongs to it through (collection_id, sha256), and goes when it goes."""
    return ForeignKeyConstraint(["collection_id", "sha256"], ["images.collection_id", "images.sha256"], ondelete="CASCADE")


class Feature(Base):
    """The raw pooled ResNet50 output of an image in half precision (the CNN computes no finer in bf16), kept so PCA
    can be refitted without running the CNN again; a collection loaded with --raw-features none keeps none."""

    __tablename__ = "features"
    __table_args__ = (picture_key(), {"postgresql_partition_by": "LIST (collection_id)"})

    collection_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    raw = mapped_column(HALFVEC(RAW_DIMS), nullable=False)


class IngestFailure(Base):
    """A file that could not be ingested, and why. One row per path and collection; the latest reason wins."""

    __tablename__ = "ingest_failures"
    __table_args__ = (UniqueConstraint("collection_id", "path"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class FinetuneSplit(Base):
    """Which images of a collection a fine-tuning run trains on and which it holds out, recorded once per run.

    `run` is the name of the collection the run produces (`ingest finetune --into`), so a rerun reuses the split
    and evaluation never sees a training image.
    """

    __tablename__ = "finetune_splits"
    __table_args__ = (picture_key(), Index("ix_finetune_splits_run", "run"), {"postgresql_partition_by": "LIST (collection_id)"})

    collection_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run: Mapped[str] = mapped_column(Text, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    image_id: Mapped[int] = mapped_column(BigInteger)
    split: Mapped[str] = mapped_column(Text)  # 'train' or 'holdout'


class ImagePath(Base):
    """A file holding a stored picture. A picture is embedded once per collection (by sha256) but may live in
    several places: every one is a row here, and images.path is the one searches show. One picture per path: the
    unique (collection_id, path) here, and on a cluster, where a unique key must hold the distribution column, the
    writers (docs/storage.md)."""

    __tablename__ = "image_paths"
    __table_args__ = (
        picture_key(),
        UniqueConstraint("collection_id", "path"),
        Index("ix_image_paths_collection_id_image_id", "collection_id", "image_id"),
        {"postgresql_partition_by": "LIST (collection_id)"},
    )

    collection_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    image_id: Mapped[int] = mapped_column(BigInteger)
