#!/usr/bin/env bash
# Alembic (PyPI, pinned), for the external migrator's tests. Idempotent: nothing to do when
# the virtualenv's alembic runs. The tests look for it in $UPSHIFT_TEST_ALEMBIC, else here.
set -euo pipefail

VENV=${UPSHIFT_ALEMBIC_VENV:-/var/cache/upshift-alembic}
PACKAGES=("alembic==1.20.1" "SQLAlchemy==2.1.9" "psycopg[binary]==3.3.9")

if "$VENV/bin/alembic" --version >/dev/null 2>&1 \
    && "$VENV/bin/python" -c 'import psycopg, sqlalchemy' >/dev/null 2>&1; then
    exit 0
fi
echo "installing ${PACKAGES[*]} (PyPI) into $VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}"
"$VENV/bin/alembic" --version
