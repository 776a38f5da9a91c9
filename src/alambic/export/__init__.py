"""Exports of a trained model to the runtimes people deploy on, and loading them back to measure them.

- :mod:`alambic.export.onnx_graph`: ONNX graphs (torch's exporter) and their int8 quantisation (ONNX Runtime);
- :mod:`alambic.export.gguf_file`: GGUF files for llama.cpp (f32 / f16 / q8_0);
- :mod:`alambic.export.torch_int8`: PyTorch dynamic int8 quantisation of the linear layers;
- :mod:`alambic.export.runtime`: an export folder's manifest, and the exported model loaded in its runtime behind
  the call signature of a transformers model, so evaluation and timing code runs on it unchanged.

The verb itself (checks, parity against PyTorch, the folder) is :func:`alambic.workflows.export.export`.
"""
