"""MQTT transport gateway: a device-facing MQTT 3.1/3.1.1/5 listener (plain and TLS), ThingsBoard-compatible."""
