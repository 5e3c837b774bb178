# MLflow tracking server with the PostgreSQL driver, started by `python -m services.stack.entrypoints mlflow`.
# Built by compose (`make up`) with the settings of .env; by hand:
#   docker build -f images/mlflow.Dockerfile -t facenet-mlflow .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ARG WHEELHOUSE=0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY images/pip-install.sh /usr/local/bin/pip-install
COPY images/requirements/mlflow.txt /tmp/requirements-mlflow.txt
RUN --mount=type=secret,id=pip_ca --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    pip-install -r /tmp/requirements-mlflow.txt

WORKDIR /app
# Only the entrypoint code is needed (no torch): the project without its dependencies.
COPY pyproject.toml ./
COPY facenet ./facenet
COPY services ./services
RUN --mount=type=secret,id=pip_ca --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    pip-install --no-deps . \
 && useradd --create-home --uid 10001 mlflow \
 && mkdir -p /mlartifacts \
 && chown mlflow /mlartifacts

USER 10001
EXPOSE 5000
CMD ["python", "-m", "services.stack.entrypoints", "mlflow"]
