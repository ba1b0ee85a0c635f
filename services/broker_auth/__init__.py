"""The HTTP authentication endpoint external brokers call in bridge mode (EMQX, RabbitMQ).

After provisioning, the operator's broker (not our MQTT gateway) admits devices; it asks this
service, which asks the credentials service over the bus (never Postgres). Provisioning clients
(username ``provision``) are admitted too, limited to their own request and response topics.
"""
