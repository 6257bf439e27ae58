"""watermarks for indexes, an HNSW flag, and the precision a collection was embedded at

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 14:45:00

- collections.embedding_seq: bumped by every transaction that writes embeddings of the collection (it
  holds the collection row while it does); images.embedding_seq says which one wrote each row. An Annoy
  file records the value it was built at, so rows newer than the file (its delta) are found through the
  (collection_id, embedding_seq) index, and nothing has to scan `images` to tell whether the file is fresh.
- collections.removed_rows: how many rows were ever removed, so an index knows how many of its items may
  be gone and fetches that many more.
- collections.hnsw: the collection has (or wants) a pgvector HNSW index; loads and refits keep it.
- collections.precision: the arithmetic the CNN ran in ('fp32' or 'bf16'); queries use the same.
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('collections', sa.Column('embedding_seq', sa.BigInteger(), server_default='0', nullable=False))
    op.add_column('collections', sa.Column('removed_rows', sa.BigInteger(), server_default='0', nullable=False))
    op.add_column('collections', sa.Column('hnsw', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column('collections', sa.Column('precision', sa.Text(), server_default='fp32', nullable=False))
    op.add_column('images', sa.Column('embedding_seq', sa.BigInteger(), server_default='0', nullable=False))
    op.create_index('ix_images_collection_id_embedding_seq', 'images', ['collection_id', 'embedding_seq'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_images_collection_id_embedding_seq', table_name='images')
    op.drop_column('images', 'embedding_seq')
    op.drop_column('collections', 'precision')
    op.drop_column('collections', 'hnsw')
    op.drop_column('collections', 'removed_rows')
    op.drop_column('collections', 'embedding_seq')
