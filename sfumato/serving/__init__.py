"""The request path inside Triton: request parsing, schedulers and the numpy denoising pipeline."""
