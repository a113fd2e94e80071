"""Release 2.0.0, expand: tags on notes. Additive, so 1.0.0 keeps working.

The first revision of the `expand` branch: upshift runs it before 2.0.0 is deployed.

Revision ID: e1
Revises: a1
"""
from alembic import op
import sqlalchemy as sa

revision = "e1"
down_revision = "a1"
branch_labels = ("expand",)
depends_on = None


def upgrade():
    op.create_table(
        "tags",
        sa.Column("note_id", sa.BigInteger, sa.ForeignKey("notes.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("note_id", "name"),
    )


def downgrade():
    op.drop_table("tags")
