"""drop collections.normalization

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 11:40:00

The column was written once ('l2') and never read: every collection normalises raw features to unit
length before PCA (ingest/reduce.py), and that is the only normalisation there is.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_column('collections', 'normalization')


def downgrade() -> None:
    op.add_column('collections', sa.Column('normalization', sa.Text(), server_default='l2', nullable=False))
