"""Engine processes: workers running batches, executors placing them (Ray or in-process), and the
driver loop (EngineCore) feeding them from the shared pipeline."""
