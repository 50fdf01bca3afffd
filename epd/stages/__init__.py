"""Stage instances, schedulers, routing and workers of the E, P and D pools."""
