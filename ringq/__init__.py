"""Engine for Ring Quantization: config, data, training/evaluation loops,
checkpoint I/O, packing and distributed set-up, shared by the CLI scripts."""
