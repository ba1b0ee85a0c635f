"""``python -m provisioning_cli``: the same as the ``provisioning`` console script."""

from .app import main

main()
