#!/usr/bin/env bash
# Installs what `make e2e-distributed` needs, only what is missing (a fresh CI machine has Python and pip):
# Debian's postgresql and redis-server, and .venv-dist: the project with Airflow 3.3.2 plus the Celery and
# Amazon providers, s3fs, moto's server, psycopg2 and asyncpg (Airflow opens an async engine too). A separate
# virtualenv, so that the main test venv (.venv, `make test`) never sees these providers. It is rebuilt when
# pyproject.toml or these pins change.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
AIRFLOW_VERSION=${AIRFLOW_VERSION:-3.3.2}
VENV=.venv-dist
PINS=(
  "apache-airflow==${AIRFLOW_VERSION}"
  "apache-airflow-providers-celery==3.26.0"
  "apache-airflow-providers-amazon[s3fs]==9.39.0"
  "s3fs==2026.9.0"
  "moto[server]==5.2.5"
  "psycopg2-binary==2.9.13"
  "asyncpg==0.32.0"
  # celery 5.7 dropped celery.backends.database.retry, which the Celery provider 3.26.0 imports
  "celery[redis]==5.6.3"
)
STAMP="$VENV/.installed-$(printf '%s\n' "${PINS[@]}" | cat - pyproject.toml | sha1sum | cut -c1-12)"

need_apt=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && id postgres >/dev/null 2>&1 || need_apt+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if ((${#need_apt[@]})); then
  echo "e2e-distributed setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d 101: the packages must not start their system-wide services (the suite starts its own).
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
fi

if [ ! -e "$STAMP" ]; then
  echo "e2e-distributed setup: building $VENV"
  rm -rf "$VENV"
  # ignored before anything is installed, so that git and ruff never see a half-built virtualenv
  mkdir "$VENV" && echo '*' >"$VENV/.gitignore"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${PINS[@]}" -e ".[test]"
  "$VENV/bin/python" -m pip check
  touch "$STAMP"
fi
echo "e2e-distributed setup: $(ls -d /usr/lib/postgresql/*/ | xargs -n1 basename | sed 's/^/PostgreSQL /' | tail -1)," \
  "$(redis-server --version | cut -d' ' -f1-3), $("$VENV/bin/python" -m pip list 2>/dev/null |
    grep -E '^(apache-airflow|apache-airflow-providers-(celery|amazon)|celery|moto|s3fs|boto3) ' | tr -s ' ' '=' | paste -sd' ')"
