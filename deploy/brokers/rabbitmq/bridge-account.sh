#!/bin/sh
# The bridge's account in RabbitMQ's internal database, allowed exactly what the bridge does:
# its own MQTT session queue, reading provision/request/# and writing provision/response/<client id>.
# Usage: BRIDGE_PASSWORD=... [VHOST=/] [BRIDGE_CLIENT_ID=provisioning-bridge-<hostname>] sh bridge-account.sh
set -eu
: "${BRIDGE_PASSWORD:?set BRIDGE_PASSWORD (the password in MQTT_BROKER_URL)}"
VHOST="${VHOST:-/}"
USER=provisioning-bridge

# "--": a password may begin with "-" (rabbitmqctl would take it for an option)
rabbitmqctl add_user -- "$USER" "$BRIDGE_PASSWORD" 2>/dev/null || rabbitmqctl change_password -- "$USER" "$BRIDGE_PASSWORD"
# configure / write / read on its session queue(s) (mqtt-subscription-<client id>qos1) and the MQTT exchange
rabbitmqctl set_permissions -p "$VHOST" "$USER" \
  '^mqtt-(subscription|will)-provisioning-bridge.*$' \
  '^(amq\.topic|mqtt-(subscription|will)-provisioning-bridge.*)$' \
  '^(amq\.topic|mqtt-(subscription|will)-provisioning-bridge.*)$'
# topic permissions on amq.topic: write answers, read (subscribe to) requests
rabbitmqctl set_topic_permissions -p "$VHOST" "$USER" amq.topic '^provision\.response\..+$' '^provision\.request\.#$'
