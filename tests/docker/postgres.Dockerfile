# Test-only: PostgreSQL from Debian's package on the local base image (Docker Hub's postgres:16 may be
# unreachable), standing in for compose.yaml's `postgres` service with the same environment
# (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB) and data folder. It listens on 127.0.0.1:$PGPORT only.
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data \
 && chown -R postgres:postgres /var/lib/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
RUN chmod 755 /usr/local/bin/postgres-entrypoint
USER postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
ENTRYPOINT ["postgres-entrypoint"]
