# CPU image with the same environment as scripts/setup.sh (torch CPU build, fbgemm-gpu-cpu, torchrec
# --no-deps, DeepSpeed ops prebuilt, Java 17 for Spark). Build: docker build -t sellarec .
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless build-essential make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/sellarec
COPY requirements/ requirements/
COPY scripts/ scripts/
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY embeddings/ embeddings/
COPY llm/ llm/
COPY launcher/ launcher/
COPY configs/ configs/
COPY bench/ bench/
COPY tests/ tests/
COPY Makefile ./
ENV VENV=/opt/venv SPARK_LOCAL_IP=127.0.0.1
RUN scripts/setup.sh cpu
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/sellarec
CMD ["make", "demo", "VENV=/opt/venv"]
