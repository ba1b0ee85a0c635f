#!/bin/sh
# docker-compose.yml's RabbitMQ: writes the bus's definitions (users per service, their permissions, the
# request queues and exchanges; provisioning_common/bus_permissions.py) from definitions.template.json and
# the passwords in the environment, then starts RabbitMQ, which loads them at boot (compose.conf).
# The passwords are letters, digits and - _ . ~ (.env.example), so they go into JSON and sed as they are.
# RENDER_ONLY=1: write the file and stop (tests/deploy runs it that way).
set -eu
template=${DEFINITIONS_TEMPLATE:-/etc/rabbitmq/provisioning/definitions.template.json}
out=${DEFINITIONS_FILE:-/tmp/provisioning-definitions.json}
case "${BUS_QUEUE_TYPE:-classic}" in
  classic) arguments='{"x-queue-type": "classic"}' ;;
  quorum) arguments='{"x-queue-type": "quorum", "x-delivery-limit": 5}' ;;
  *) echo "BUS_QUEUE_TYPE must be classic or quorum" >&2; exit 1 ;;
esac
script='s/"__QUEUE_ARGUMENTS__"/'"$arguments"'/'
for variable in RABBITMQ_USER RABBITMQ_PASSWORD RABBITMQ_PROVISIONING_CORE_PASSWORD RABBITMQ_CREDENTIALS_PASSWORD \
    RABBITMQ_ADMIN_API_PASSWORD RABBITMQ_HTTP_GATEWAY_PASSWORD RABBITMQ_MQTT_GATEWAY_PASSWORD \
    RABBITMQ_COAP_GATEWAY_PASSWORD RABBITMQ_MQTT_BRIDGE_PASSWORD RABBITMQ_BROKER_AUTH_PASSWORD \
    RABBITMQ_BACKEND_PASSWORD; do
  value=$(printenv "$variable" || true)
  case "$value" in
    '' ) echo "$variable is not set (.env)" >&2; exit 1 ;;
    *[!A-Za-z0-9._~-]*) echo "$variable: only letters, digits and - _ . ~" >&2; exit 1 ;;
  esac
  script="$script;s/__${variable}__/$value/g"
done
umask 077
sed "$script" "$template" > "$out"
if [ "${RENDER_ONLY:-0}" = 1 ]; then exit 0; fi
chown rabbitmq:rabbitmq "$out"
exec docker-entrypoint.sh rabbitmq-server
