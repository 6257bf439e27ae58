"""image_paths: every path of every stored picture

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 15:00:00

A picture is stored (and embedded) once per collection, by content (sha256); image_paths records every file that
holds it, so duplicates are visible and a load can tell a moved file from a new one. images.path stays the path
searches show (one of the image's paths). Existing rows are backfilled with their one path. Readable by ris_reader.
"""
from alembic import op
import sqlalchemy as sa


GRANT_READER = """
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'ris_reader') THEN
    GRANT SELECT ON image_paths TO ris_reader;
  END IF;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'image_paths not granted to ris_reader: %', SQLERRM;
END $$;
"""

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('image_paths',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('image_id', sa.BigInteger(), nullable=False),
    sa.Column('collection_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['collection_id'], ['collections.id'], name=op.f('fk_image_paths_collection_id_collections'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_image_paths_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_image_paths')),
    sa.UniqueConstraint('collection_id', 'path', name=op.f('uq_image_paths_collection_id'))
    )
    op.create_index(op.f('ix_image_paths_image_id'), 'image_paths', ['image_id'], unique=False)
    op.execute("INSERT INTO image_paths (image_id, collection_id, path) SELECT id, collection_id, path FROM images")
    op.execute(GRANT_READER)


def downgrade() -> None:
    op.drop_index(op.f('ix_image_paths_image_id'), table_name='image_paths')
    op.drop_table('image_paths')
