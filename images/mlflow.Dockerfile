# MLflow tracking server with the PostgreSQL driver, started by `python -m services.entrypoints mlflow`.
# Build: docker build -f images/mlflow.Dockerfile -t facenet-mlflow .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG MLFLOW_VERSION=3.17.2
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==2.9.13" "redis>=5" "psutil>=5.9"

WORKDIR /app
# Only the entrypoint code is needed (no torch): the project without its dependencies.
COPY pyproject.toml ./
COPY facenet ./facenet
COPY services ./services
RUN pip install --no-deps . \
 && useradd --create-home --uid 10001 mlflow \
 && mkdir -p /mlartifacts \
 && chown mlflow /mlartifacts

USER 10001
EXPOSE 5000
CMD ["python", "-m", "services.entrypoints", "mlflow"]
