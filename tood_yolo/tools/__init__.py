"""Tools around a trained model: the alignment study and maps, COCO scoring, the reference's evaluation protocol,
mmdet checkpoint conversion, deployment sources and ONNX inference, and the key=value command lines."""
