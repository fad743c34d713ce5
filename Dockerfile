# Worker image for Ascend hosts. The CANN toolkit must match the host driver; start from Ascend's own
# CANN base image for your version (the ARG below), which provides Python 3.11 and the runtime libraries.
ARG CANN_IMAGE=ascendai/cann:8.3.rc1-910b-ubuntu22.04-py3.11
FROM ${CANN_IMAGE}
WORKDIR /opt/kiq
COPY pyproject.toml README.md ./
COPY kiq ./kiq
COPY producer ./producer
COPY worker ./worker
RUN python3 -m pip install --no-cache-dir '.[worker]'
CMD ["kiq", "worker"]
