# lamabus service image. The broker runs in its own container (docker-compose.yml).
#
# The build stage installs through install.sh, the same script and llama.cpp flags as a
# checkout (GGML_NATIVE=OFF: a native build picks up AMX on the build host and segfaults
# there). tests/test_packaging.py runs this stage's install command and checks what it
# installed, so the image cannot drift from it.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY install.sh pyproject.toml requirements-llama.txt README.md ./
COPY wire wire
COPY bus bus
COPY handlers handlers
COPY domain domain
COPY storage storage
COPY engine engine
RUN LAMABUS_VENV=/opt/lamabus LAMABUS_EXTRAS= LAMABUS_EDITABLE=0 PYTHON=python3.11 ./install.sh

FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/lamabus /opt/lamabus
RUN useradd --create-home --uid 10001 lamabus && mkdir -p /data /models && chown lamabus /data /models
USER lamabus
ENV PATH=/opt/lamabus/bin:$PATH LAMABUS_DATA_DIR=/data LAMABUS_MODEL_DIRS=/models
VOLUME ["/data", "/models"]
ENTRYPOINT ["lamabus"]
CMD ["serve"]
