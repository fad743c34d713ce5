# kiq's worker for Ascend hosts (mindone on MindSpore). The CANN toolkit must match the host driver: start from
# Ascend's own CANN image for your version (BASE_IMAGE), which provides Python 3.11 and the runtime libraries.
# The same structure as Dockerfile.cpu and Dockerfile.cuda; only BASE_IMAGE, EXTRAS and the ENV line differ.
# Behind a TLS-inspecting proxy: docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
ARG BASE_IMAGE=ascendai/cann:8.3.rc1-910b-ubuntu22.04-py3.11

FROM ${BASE_IMAGE} AS build
ARG EXTRAS=worker
WORKDIR /src
# --system-site-packages: what the base image ships (CANN's Python packages, the CUDA image's torch) is used as is.
RUN python3 -m venv --system-site-packages /opt/kiq
COPY pyproject.toml ./
# Dependencies in their own layer, read from pyproject.toml: a source change does not reinstall them.
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && /opt/kiq/bin/python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [d for e in sys.argv[1].split(',') if e for d in p['optional-dependencies'][e]]))" \
      "$EXTRAS" > requirements.txt \
 && /opt/kiq/bin/pip install --disable-pip-version-check -r requirements.txt
COPY README.md ./
COPY kiq ./kiq
COPY producer ./producer
COPY worker ./worker
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && /opt/kiq/bin/pip install --disable-pip-version-check --no-deps . \
 && /opt/kiq/bin/pip uninstall -y -q pip

FROM ${BASE_IMAGE}
# Shared libraries the wheels need from the system (CANN ships them).
ARG RUNTIME_PACKAGES=""
RUN if [ -n "$RUNTIME_PACKAGES" ]; then apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $RUNTIME_PACKAGES \
      && apt-get clean && rm -rf /var/lib/apt/lists/*; fi
# No compilers or pip cache here: only the built venv is copied. Models: a mounted cache at /models (HF_HOME), or
# tiny random-weight ones written to /var/lib/kiq/tiny by `kiq make-tiny-models`.
RUN useradd --uid 10001 --create-home --home-dir /home/kiq kiq \
 && mkdir -p /models /var/lib/kiq/tiny /cache/torchinductor && chown kiq:kiq /var/lib/kiq/tiny /cache/torchinductor
COPY --from=build /opt/kiq /opt/kiq
ENV PATH=/opt/kiq/bin:$PATH PYTHONUNBUFFERED=1 HF_HOME=/models/hf KIQ_DEVICE_TARGET=Ascend
USER kiq
WORKDIR /home/kiq
ENTRYPOINT ["kiq"]
CMD ["worker"]
