# helix-sandbox-python for machines with an image registry.
# Without one, docker/build-offline.sh builds an equivalent image from Debian packages.
#
#   docker build -f docker/python.Dockerfile -t helix-sandbox-python docker
#
# Nothing is copied in, so the docker/ directory is context enough (the repository root would
# send target/ to the daemon for nothing).
FROM python:3.12-slim

# pytest for test tasks; procps for kill/ps (the offline image has both too).
# The sandbox user is uid/gid 1000, matching the engine's `--user 1000:1000`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends procps \
 && rm -rf /var/lib/apt/lists/* \
 && pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore pytest \
 && groupadd --gid 1000 sandbox \
 && useradd --uid 1000 --gid 1000 --home-dir /home/sandbox --create-home --shell /bin/sh sandbox \
 && install -d -o 1000 -g 1000 -m 0755 /workspace

ENV PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8 \
    HOME=/home/sandbox
LABEL helix.image=python org.opencontainers.image.title=helix-sandbox-python
USER 1000:1000
WORKDIR /workspace
CMD ["/bin/sh"]
