# Shared helpers for scripts/run and scripts/test (sourced, not executed).

ensure_uv() {
  if ! command -v uv >/dev/null 2>&1; then
    echo ">> installing uv" >&2
    python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
    export PATH="$HOME/.local/bin:$PATH"
  fi
  command -v uv >/dev/null 2>&1 || { echo "!! could not install uv" >&2; exit 1; }
}

sync_env() {
  echo ">> uv sync" >&2
  uv sync --frozen --quiet
}

# The local embedder's int8 ONNX model is built from the installed weights package, once per
# environment (cached in .venv/share/atrium/models; seconds, no-op when cached). Building it here
# rather than on first use keeps the API, the worker's processes and the tests from waiting on it.
ensure_embedding_model() {
  uv run --frozen python -m atrium.embedding.model_build
}

wait_for() {  # wait_for <seconds> <command...>
  local limit=$1; shift
  for _ in $(seq 1 $((limit * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  return 1
}

mariadb_up() { mysqladmin --protocol=tcp -h 127.0.0.1 -P 3306 -u root ping; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }

ensure_test_services() {
  if ! mariadb_up >/dev/null 2>&1; then
    echo ">> MariaDB is not running on 127.0.0.1:3306; starting it" >&2
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
    wait_for 60 mariadb_up || { echo "!! MariaDB did not start on 127.0.0.1:3306; the tests need it" >&2; exit 1; }
  fi
  if ! redis_up >/dev/null 2>&1; then
    echo ">> Redis is not running on 127.0.0.1:6379; starting it" >&2
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for 30 redis_up || { echo "!! Redis did not start on 127.0.0.1:6379; the tests need it" >&2; exit 1; }
  fi
}
