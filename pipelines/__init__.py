"""Model backends: load, warm up and run diffusion pipelines; no HTTP here."""
