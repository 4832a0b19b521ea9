# The `sae` CLI in an image; Kubernetes runs every job with it (k8s/).
#   docker build --target cpu -t sae-pipeline:cpu .
#   docker build --target gpu -t sae-pipeline:gpu .     # TensorFlow with its CUDA wheels
#   docker run --rm sae-pipeline:cpu --help
# The install step is the Makefile's, without the test extras and the editable mode.
FROM python:3.11-slim AS source
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /tmp sae
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY preprocessing preprocessing
COPY trainer trainer
COPY pipeline pipeline
# The package as a wheel, for remote Beam workers launched from a pod (the source is not
# kept): BEAM_OPTIONS=... --extra_package=/opt/sae/sae_pipeline-<version>-py3-none-any.whl
RUN pip wheel --no-deps --wheel-dir /opt/sae .

FROM source AS gpu
RUN pip install '.[gpu]' && rm -rf /src
# GKE mounts the node's NVIDIA driver libraries here.
ENV LD_LIBRARY_PATH=/usr/local/nvidia/lib64 HOME=/tmp
WORKDIR /tmp
USER 1000:1000
ENTRYPOINT ["sae"]

# Last, so a plain `docker build .` builds it.
FROM source AS cpu
RUN pip install . && rm -rf /src
ENV HOME=/tmp
WORKDIR /tmp
USER 1000:1000
ENTRYPOINT ["sae"]
