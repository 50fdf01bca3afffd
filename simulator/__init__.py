"""SimPy model of the EPD stage clusters: the engine's own pipeline logic driven by latency models."""
