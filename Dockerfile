# lmcache-standalone-server (not the LMCache project's lmcache/standalone image): `docker build -t lmcache-standalone-server:0.1.0 .`, then `docker run ... lmcache-standalone-server:0.1.0 /opt/venv/bin/lmcache server ...`
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
COPY . /src
RUN /opt/venv/bin/pip install --no-cache-dir /src

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 5555 8080
CMD ["/opt/venv/bin/lmcache", "server", "--l1-size-gb", "1", "--host", "0.0.0.0"]
