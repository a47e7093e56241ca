"""Below the network, as Ultralytics keeps its losses, assigners and metrics in `ultralytics/utils` under
`ultralytics/nn/tasks.py`: TOOD's assigners and loss, the training recipes they follow, and COCO scoring."""
