# Triton for Sfumato: NVIDIA's NGC tritonserver 24.10 (Triton 2.51, the version of the
# nvidia-pytriton wheel the project tests against; Ubuntu 22.04, Python 3.10) plus what the
# python-backend models import: sfumato.serving (the pipeline, schedulers, tokenizer,
# contract) and sfumato.errors, numpy<2, tokenizers, and ONNX Runtime with CUDA for the `cpu`
# export target's python-backend network models. The onnxruntime and tensorrt targets are served
# by Triton's own backends, already in the base image.
#
#   docker build -f docker/triton.Dockerfile -t sfumato/triton:0.1.0 .
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${TRITON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/constraints.txt /tmp/constraints.txt
# Pinned to the versions the suite ran with (constraints), plus the CUDA build of ONNX Runtime.
RUN python3 -m pip install --target /opt/sfumato/site -c /tmp/constraints.txt \
        "numpy<2" tokenizers "onnxruntime-gpu==1.20.1" \
    && find /opt/sfumato/site -name '__pycache__' -prune -exec rm -rf {} +
COPY sfumato/__init__.py sfumato/errors.py /opt/sfumato/site/sfumato/
COPY sfumato/serving /opt/sfumato/site/sfumato/serving

FROM ${TRITON_IMAGE}
LABEL org.opencontainers.image.title="sfumato triton" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/sfumato/site /opt/sfumato/site
# The python backend's stub runs the base image's Python 3.10 and finds our packages here.
ENV PYTHONPATH=/opt/sfumato/site \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 sfumato \
    && useradd --system --uid 10001 --gid sfumato --no-create-home --home-dir /tmp sfumato
USER 10001:10001
EXPOSE 8000 8001 8002
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/models/repository", "--model-control-mode=explicit", "--load-model=*"]
