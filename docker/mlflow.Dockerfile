# MLflow tracking server image: MLflow with the PostgreSQL driver (backend store) and the GCS
# client (artifact proxy). The upstream ghcr.io/mlflow/mlflow image is a bare `pip install mlflow`
# and crashes on a postgresql:// backend store. Build from the repository root:
#   docker build -f docker/mlflow.Dockerfile -t REGISTRY/dreambooth-mlflow:3.17.2 .
# then pin the pushed digest in manifests/overlays/*/kustomization.yaml (images:).
FROM python:3.11.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY docker/mlflow-requirements.txt /tmp/mlflow-requirements.txt
RUN pip install -r /tmp/mlflow-requirements.txt \
    && useradd --uid 1000 --create-home mlflow
USER 1000
EXPOSE 5000
# The manifest (manifests/base/mlflow.yaml) gives the command and every argument.
CMD ["mlflow", "server", "--help"]
