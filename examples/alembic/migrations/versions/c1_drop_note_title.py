"""Release 2.0.0, contract: 2.0.0 no longer uses notes.title; 1.0.0 does.

The first revision of the `contract` branch: upshift runs it only once 2.0.0 is verified.

Revision ID: c1
Revises: a1
"""
from alembic import op
import sqlalchemy as sa

revision = "c1"
down_revision = "a1"
branch_labels = ("contract",)
depends_on = None


def upgrade():
    op.drop_column("notes", "title")


def downgrade():
    op.add_column("notes", sa.Column("title", sa.Text, nullable=False, server_default=""))
