"""a partition per collection, pictures keyed by content, raw features in half precision

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 13:00:00

images, features, image_paths and finetune_splits become LIST-partitioned by collection_id, every row about a picture
keyed by (collection_id, sha256) (migrations/partitioned_layout.py; the design in docs/storage.md); images.id and its
sequence are kept. features.raw becomes halfvec(2048). collections.raw_features: 'half' (kept) or 'none' (dropped once
the PCA is fitted). The per-collection HNSW indexes (partial indexes on the old table) go with it: `ingest db upgrade`
builds them again on the partitions. A database holding pictures converts only through `ingest db upgrade` (batches,
progress, rerunnable); this revision then swaps the tables. Downgrading gives float32 features back at half precision.
"""
from alembic import op
import sqlalchemy as sa

from migrations import partitioned_layout

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

GRANT_READER = """
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'ris_reader') THEN
    GRANT SELECT ON images, features, image_paths, finetune_splits TO ris_reader;
  END IF;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'tables not granted to ris_reader: %', SQLERRM;
END $$;
"""


def upgrade() -> None:
    partitioned_layout.swap(op.get_bind())
    op.add_column('collections', sa.Column('raw_features', sa.Text(), server_default='half', nullable=False))
    op.execute(GRANT_READER)


def downgrade() -> None:
    op.drop_column('collections', 'raw_features')
    partitioned_layout.swap_back(op.get_bind())
    op.execute(GRANT_READER)
