"""hpcflow.kernels: CUDA sources, host harness and loaders for plaquette and staple."""
