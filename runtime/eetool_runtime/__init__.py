"""eetool-runtime: runs an early-exit bundle written by ``eetool export`` with onnxruntime, without PyTorch."""

__version__ = "0.1.0"
