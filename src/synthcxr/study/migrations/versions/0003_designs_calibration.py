"""Study designs (single image / paired two-alternative), calibration block, counterbalancing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 15:30:00

Existing studies become single-image studies without calibration; their tasks are main tasks.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('design', sa.String(length=16), nullable=False, server_default='single'))
        batch_op.add_column(sa.Column('options', sa.JSON(), nullable=True))
    with op.batch_alter_table('image', schema=None) as batch_op:
        batch_op.add_column(sa.Column('role', sa.String(length=16), nullable=False, server_default='study'))
    with op.batch_alter_table('task', schema=None) as batch_op:
        batch_op.add_column(sa.Column('phase', sa.String(length=16), nullable=False, server_default='main'))
        batch_op.add_column(sa.Column('image2_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('block', sa.String(length=200), nullable=True))
        batch_op.create_foreign_key('fk_task_image2_id_image', 'image', ['image2_id'], ['id'])
    with op.batch_alter_table('answer', schema=None) as batch_op:
        batch_op.add_column(sa.Column('picked', sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('answer', schema=None) as batch_op:
        batch_op.drop_column('picked')
    with op.batch_alter_table('task', schema=None) as batch_op:
        batch_op.drop_constraint('fk_task_image2_id_image', type_='foreignkey')
        batch_op.drop_column('block')
        batch_op.drop_column('image2_id')
        batch_op.drop_column('phase')
    with op.batch_alter_table('image', schema=None) as batch_op:
        batch_op.drop_column('role')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('options')
        batch_op.drop_column('design')
