#!/usr/bin/env bash
# Makes sure the services HCP's tests use are running on this machine:
# PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth) and NATS with
# JetStream on 127.0.0.1:4222. Starts them when installed but stopped, and
# installs them from Debian packages when missing (needs root); RabbitMQ is
# only installed (the tests start nodes of their own).
# Source this file, then call ensure_postgres / ensure_nats / ensure_rabbitmq.

log() { echo "[services] $*" >&2; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "need root to install $*"; return 1
  fi
  if [ -z "${HCP_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
    export HCP_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  return 1
}

ensure_postgres() {
  if port_open 5432; then return 0; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    log "installing PostgreSQL"
    apt_install postgresql || return 1
  fi
  local version; version=$(ls /etc/postgresql | sort -V | tail -n 1)
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  # Tests connect as postgres over TCP without a password, as on CI.
  if ! grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  fi
  log "starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  wait_port 5432 || { log "PostgreSQL did not come up"; return 1; }
}

ensure_nats() {
  if port_open 4222; then return 0; fi
  if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    log "installing nats-server"
    apt_install nats-server || return 1
  fi
  local bin; bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  mkdir -p /var/lib/nats-server
  log "starting NATS with JetStream"
  start-stop-daemon --start --oknodo --background --exec "$bin" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log >&2
  wait_port 4222 || { log "NATS did not come up"; return 1; }
}

# RabbitMQ (Debian's package) for the queue tests: testkit/src/rabbitmq.rs
# starts its own nodes per test (own ports, node names, data and cookie),
# so only the package is needed; no service is started here.
ensure_rabbitmq() {
  if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null 2>&1; then
    return 0
  fi
  log "installing rabbitmq-server"
  apt_install rabbitmq-server || { log "could not install rabbitmq-server"; return 1; }
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || { log "rabbitmq-server is missing after installing it"; return 1; }
}

# The Hyper-V simulator's independent client check needs pywinrm, kept in
# its own venv (PyPI) so the system Python stays as it is. Exports
# HCP_WINRM_PYTHON for the test (providers/hyperv/sim/tests/winrm.rs).
ensure_python_winrm() {
  local venv="${HCP_WINRM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hcp/winrm-venv}"
  ensure_venv "$venv" "import winrm, xmltodict" pywinrm || return 1
  export HCP_WINRM_PYTHON="$venv/bin/python"
}

# A venv at $1 in which the Python statement $2 runs, made (once) by
# installing the pip requirements after it.
ensure_venv() {
  local venv="$1" check="$2"; shift 2
  if "$venv/bin/python" -c "$check" 2>/dev/null; then return 0; fi
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    log "installing python3 with venv"
    apt_install python3 python3-venv || return 1
  fi
  log "installing $* in $venv"
  python3 -m venv "$venv" >&2 || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" >&2 || return 1
  "$venv/bin/python" -c "$check"
}

# The example Python provider needs grpcio and grpcio-tools.
ensure_python_grpc() {
  if python3 -c "import grpc, grpc_tools" 2>/dev/null; then return 0; fi
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
    log "installing python3 and pip"
    apt_install python3 python3-pip || return 1
  fi
  log "installing grpcio for the Python example provider"
  python3 -m pip install -q --disable-pip-version-check -r providers/python-example/requirements.txt >&2 ||
    python3 -m pip install -q --break-system-packages -r providers/python-example/requirements.txt >&2
}

# A real Prometheus server (Debian's package) for the metrics test; it is
# run by the test on a port of its own, never as the package's service.
ensure_prometheus() {
  if command -v prometheus >/dev/null 2>&1; then
    export HCP_PROMETHEUS="$(command -v prometheus)"; return 0
  fi
  log "installing prometheus"
  apt_install prometheus || return 1
  # The package starts its own service where it can; the tests do not use it.
  if command -v service >/dev/null 2>&1; then service prometheus stop >/dev/null 2>&1 || true; fi
  export HCP_PROMETHEUS="$(command -v prometheus)"
}

# tmux, for the test of the CLI's interactive terminal output.
ensure_tmux() {
  command -v tmux >/dev/null 2>&1 && return 0
  log "installing tmux"
  apt_install tmux
}

# Patroni, etcd and HAProxy (Debian's packages) for the PostgreSQL failover
# test bed (testkit/src/patroni.rs starts its own cluster per test; nothing
# is started here). Debian's postinst would start etcd and HAProxy as
# services where systemd runs: they are stopped again, so the test's own
# ports and data directories are the only ones.
ensure_patroni() {
  if [ -x /usr/bin/patroni ] && [ -x /usr/bin/etcd ] && [ -x /usr/sbin/haproxy ]; then return 0; fi
  log "installing patroni, etcd and haproxy"
  apt_install --no-install-recommends patroni etcd-server haproxy || return 1
  if [ -d /run/systemd/system ]; then
    systemctl disable --now etcd haproxy patroni >/dev/null 2>&1 || true
  fi
}
