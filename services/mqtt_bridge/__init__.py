"""Bridge mode: provisioning through the operator's own MQTT broker (Mosquitto, EMQX, RabbitMQ's MQTT plugin).

A paho-mqtt client takes provision requests from a shared subscription and answers each on a topic
that the broker's ACL lets only the asking client read. No provisioning rule lives here: requests go
through :class:`provisioning_common.transport_api.TransportApi`, like every gateway's.
"""
