# The MLflow tracking server of docker/compose.yaml: MLflow 3.17.x (as pinned in pyproject.toml)
# with the PostgreSQL driver psycopg 3 (compose.yaml names it: postgresql+psycopg://). The server
# command and its options are in compose.yaml. Base and package mirror: as in Dockerfile.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv && pip install "mlflow>=3.17,<3.18" "psycopg[binary]>=3.2"

# /mlartifacts exists and belongs to the server's user, so a fresh named volume does too.
RUN useradd --create-home --uid 1000 mlflow \
 && mkdir /mlartifacts \
 && chown mlflow:mlflow /mlartifacts
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--help"]
