"""Developer scripts run from the Makefile (``python -m scripts.<name>``)."""
