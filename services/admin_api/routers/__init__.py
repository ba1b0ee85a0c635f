"""The admin API's routes, one router per concern: ``profiles`` (device profiles), ``devices``
(pre-provisioned devices and look-ups). ``app`` mounts them under ``/api`` behind the bearer token."""
