# Stand-in for the postgres base image (POSTGRES_IMAGE), for hosts that reach no container registry:
# Debian bookworm's PostgreSQL 15 with an entrypoint that keeps the official image's contract
# (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, PGDATA). Built by `make base-images`.
ARG DEBIAN_IMAGE=facenet-base/debian:bookworm
FROM ${DEBIAN_IMAGE}

# No cluster at install time: the entrypoint initialises PGDATA on first start, as the official image does.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-common \
 && sed -ri 's/#?\s*create_main_cluster.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*

ENV LANG=C.UTF-8 PGDATA=/var/lib/postgresql/data \
    PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
