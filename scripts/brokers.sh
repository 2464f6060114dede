#!/usr/bin/env bash
# Make sure the local RabbitMQ and NATS (JetStream) answer on 127.0.0.1, starting them
# if they are installed but down. Exits non-zero if one cannot be brought up while CI is
# set; otherwise the integration tests skip what is missing.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port, seconds
  local deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do up "$1" && return 0; sleep 0.5; done
  return 1
}

status=0
if ! up 5672; then
  if command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached || true
  fi
  wait_for 5672 120 || { echo "RabbitMQ is not answering on 127.0.0.1:5672"; status=1; }
fi
if command -v rabbitmqctl >/dev/null && up 5672; then
  timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
if ! up 4222; then
  if [ -x /usr/sbin/nats-server ]; then
    echo "starting NATS"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
      -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
  fi
  wait_for 4222 60 || { echo "NATS is not answering on 127.0.0.1:4222"; status=1; }
fi
if [ -n "${CI:-}" ]; then exit $status; fi
exit 0
