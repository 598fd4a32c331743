# CPU image with the same environment as scripts/setup.sh cpu (torch==2.13.0 from pip's default index, no CPU
# index named; fbgemm-gpu-cpu, torchrec --no-deps, DeepSpeed ops prebuilt, Java 17 for Spark).
# Build: docker build -t sellarec .
# The image is for `make demo` and training. It has no .git, so `make test` cannot pass in it
# (tests/test_gpu_run.py builds a payload from `git ls-files`, scripts/gpu/payload.py): run the test suite
# from a git clone.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless build-essential make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/sellarec
COPY requirements/ requirements/
COPY scripts/ scripts/
COPY pyproject.toml README.md LICENSE ./
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
