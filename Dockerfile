# sidekey daemon image: the daemon only, no config, no keys, no secrets.
#
#   docker build -t sidekey:0.1.0 .
#   docker run --rm -v $PWD/etc:/etc/sidekey:ro -v sidekey-run:/run/sidekey \
#     -v sidekey-state:/var/lib/sidekey sidekey:0.1.0
#
# Config (sidekey.yaml and its includes) is mounted at /etc/sidekey, the backends'
# credentials come from mounted files or $CREDENTIALS_DIRECTORY at run time, the socket
# is created in /run/sidekey (shared with the MCP server) and state (token key set,
# state.db, audit.jsonl) goes to /var/lib/sidekey. See examples/kubernetes/pod.yaml.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sidekey
# Only what the package build needs (pyproject.toml names README.md as its readme);
# .dockerignore keeps keys, state and local venvs out of the build context as well.
COPY pyproject.toml README.md LICENSE MANIFEST.in /src/
COPY src/ /src/src/
# The wheel carries the license, the units, the examples and the docs (pyproject.toml
# data-files): the build needs them in its context (.dockerignore keeps keys and state out).
COPY systemd/ /src/systemd/
COPY examples/ /src/examples/
COPY docs/ /src/docs/
RUN /opt/sidekey/bin/pip install "/src[daemon]"

FROM python:3.11-slim
# A fixed uid/gid, so a pod's securityContext, the socket directory's owner and the
# peers selectors can name them. No login shell, no home to write to.
RUN groupadd --system --gid 10001 sidekey \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sidekey \
 && install -d -o 10001 -g 10001 -m 0750 /run/sidekey \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/sidekey \
 && install -d -m 0755 /etc/sidekey
COPY --from=build /opt/sidekey /opt/sidekey
ENV PATH=/opt/sidekey/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/sidekey
# The socket and state paths are the config's (listen.socket, state.dir); these are
# the directories prepared above. SIGTERM stops the daemon gracefully.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/sidekey/bin/sidekey"]
CMD ["serve", "--config", "/etc/sidekey/sidekey.yaml"]
