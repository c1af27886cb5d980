"""Training engines: UP-ReID pre-training (config, loader adapter, loop, checkpoints, command)."""
