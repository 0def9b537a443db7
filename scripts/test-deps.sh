#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine: the wasm32-wasip2 target,
# redis-server, and a Python venv with Celery for the interop tests (aiosmtpd for the mail
# test, gevent for make bench). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi

if ! command -v redis-server >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq redis-server >/dev/null
fi

# docker-registry (CNCF Distribution): the OCI registry `publish --registry oci://` is tested against.
if ! command -v docker-registry >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq docker-registry >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq docker-registry >/dev/null; }
fi

# chromium + chromedriver: the dashboard is tested in a real headless browser.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }
fi

# aiosmtpd: the SMTP server mail.send is tested against; gevent: Celery's pool in make bench;
# componentize-py: builds the Python example tasks (taskhost build); flower: the monitoring
# tests run real Flower; selenium drives chromium; opentelemetry: a traced Celery producer.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import celery, redis, PIL, aiosmtpd, gevent, flower, selenium, opentelemetry.instrumentation.celery' 2>/dev/null \
    || [ ! -x .venv/bin/componentize-py ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check 'celery[redis]>=5.5,<6' pillow 'aiosmtpd>=1.4,<2' 'gevent>=24,<26' \
        'componentize-py==0.25.*' 'flower>=2,<3' 'selenium>=4.20,<5' \
        'opentelemetry-sdk>=1.27,<2' 'opentelemetry-instrumentation-celery>=0.48b0'
fi

# Celery's database result backend (SQLAlchemy with psycopg 3 and PyMySQL): the SQL backend
# tests have Python clients and workers read and write the same tables as taskhost.
if ! .venv/bin/python -c 'import sqlalchemy, psycopg, pymysql' 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check 'sqlalchemy>=2,<3' 'psycopg[binary]>=3.1,<4' 'pymysql>=1.1,<2'
fi

# PostgreSQL and MariaDB for those tests: this machine kind runs both on 127.0.0.1; where
# absent they are installed from Debian and started (the tests say why they skip otherwise).
if ! command -v psql >/dev/null 2>&1 || ! pg_isready -q -h 127.0.0.1 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    command -v psql >/dev/null 2>&1 || apt-get install -y -qq postgresql >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; } || true
    service postgresql start >/dev/null 2>&1 || true
fi
if ! command -v mysql >/dev/null 2>&1 || ! mysqladmin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    command -v mysql >/dev/null 2>&1 || apt-get install -y -qq mariadb-server >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq mariadb-server >/dev/null; } || true
    service mariadb start >/dev/null 2>&1 || true
fi
