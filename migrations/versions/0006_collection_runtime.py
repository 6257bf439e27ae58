"""the runtime a collection was embedded on

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 06:30:00

- collections.runtime: what ran the CNN for the collection's vectors, 'openvino' (every processor) or
  'tensorflow' (NVIDIA GPUs, or asked for). Collections made before OpenVINO ran were embedded by TensorFlow.
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('collections', sa.Column('runtime', sa.Text(), server_default='tensorflow', nullable=False))


def downgrade() -> None:
    op.drop_column('collections', 'runtime')
