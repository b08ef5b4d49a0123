"""Deployment: the inference graph of a checkpoint, its ONNX export and the onnxruntime runner.

* ``inference_model``: a checkpoint -> the eval-mode detector (EMA weights when present), its
  class names, category ids and inference config;
* ``graph``: the module that is exported (detector, optionally with the post-processing);
* ``onnx_export``: ``torch.onnx.export(dynamo=True)`` with dynamic batch, height and width;
* ``onnx_runtime``: an exported file under onnxruntime, with the same call as the PyTorch model.

onnx / onnxruntime / onnxscript come from the ``[export]`` extra and are imported only here.
"""
