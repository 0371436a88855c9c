"""Per-study secret for reading orders, and the blinding record (source sizes, framing, leak check).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 15:30:00

Studies made before this revision get their own random key here; their stored orders are kept.
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('order_key', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('blinding', sa.JSON(), nullable=True))
    if op.get_context().as_sql:  # offline SQL script: no rows to read
        return
    conn = op.get_bind()
    study = sa.table('study', sa.column('id', sa.Integer), sa.column('order_key', sa.String))
    for (study_id,) in conn.execute(sa.select(study.c.id)).all():
        conn.execute(study.update().where(study.c.id == study_id).values(order_key=secrets.token_hex(32)))


def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('blinding')
        batch_op.drop_column('order_key')
