"""LabelPooling kernels (installed as ``dali_relabel.ops.kernels``).

- ``_label_pooling_cpu``: the compiled C++ CPU kernel (built by setup.py).
- ``label_pooling_triton``: the Triton kernel for CUDA tensors; also runs on CPU tensors under
  ``TRITON_INTERPRET=1``. Imported lazily so that importing dali_relabel never needs triton.

Use them through ``dali_relabel.label_pooling``, which checks inputs and dispatches by device.
"""
