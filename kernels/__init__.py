"""hpcflow.kernels: CUDA sources, host harness and loaders for plaquette and staple.

* ``plaquette.cu``, ``staple.cu`` (+ ``su_n.cuh``): one source for U(1)/SU(2)/SU(3),
  float64/float32, Nd = 2/4, on halo-padded local arrays, one thread per site.
* :mod:`.cuda`: CuPy ``RawModule`` loader, launches on torch CUDA tensors via DLPack on
  torch's current stream.
* :mod:`.host`: the same sources compiled with g++/OpenMP through ``host_harness.h``
  (a CPU backend and the numerical test bed of the CUDA code).
* :mod:`.autograd`: ``PlaquetteField``/``PlaquetteSum`` (backward = staple kernel).
* :mod:`.dispatch`: ``plaquette_re_tr(U, lat, backend)``, ``staple_sum(U, lat, backend)``,
  ``plaquette_sum(U, lat, backend)``; backend in {"auto", "torch", "host", "cuda"}.

Submodules are imported on use; importing this package has no side effects.
"""
