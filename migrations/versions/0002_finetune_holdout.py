"""finetune holdout splits

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 05:20:00

One table, finetune_splits: the train / hold-out split of each `ingest finetune` run, so a rerun
reuses it and evaluation never uses training images. Readable by ris_reader like the other tables.
"""
from alembic import op
import sqlalchemy as sa


GRANT_READER = """
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'ris_reader') THEN
    GRANT SELECT ON finetune_splits TO ris_reader;
  END IF;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'finetune_splits not granted to ris_reader: %', SQLERRM;
END $$;
"""

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('finetune_splits',
    sa.Column('run', sa.Text(), nullable=False),
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('collection_id', sa.Integer(), nullable=False),
    sa.Column('split', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], name=op.f('fk_finetune_splits_collection_id_collections'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_finetune_splits_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run', 'image_id', name=op.f('pk_finetune_splits'))
    )
    op.create_index(op.f('ix_finetune_splits_collection_id'), 'finetune_splits', ['collection_id'], unique=False)
    op.execute(GRANT_READER)


def downgrade() -> None:
    op.drop_index(op.f('ix_finetune_splits_collection_id'), table_name='finetune_splits')
    op.drop_table('finetune_splits')
