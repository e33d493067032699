# One image for every service of docker-compose.yml: the worker, Flower, enqueue,
# the phrase-API stand-in and the local SQS endpoint (moto, pinned in requirements.txt).
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libcurl4-openssl-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY celeryconfig.py enqueue.py ./
COPY tasks/ tasks/
COPY stack/ stack/
COPY data/ data/

RUN useradd --create-home ingest && mkdir -p var/store var/runs && chown -R ingest var
USER ingest

CMD ["celery", "-A", "tasks", "worker", "--concurrency=4", "--loglevel=INFO"]
