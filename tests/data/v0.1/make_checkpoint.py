"""Write tood-tiny.pt and tood-tiny-boxes.npz: a checkpoint saved by tood-yolo 0.1 (commit 1689379, the flat
`tood_yolo.head`/`tood_yolo.neck` layout that its pickles name) and the boxes that code predicted with it.

Run once with that commit installed: `python tests/data/v0.1/make_checkpoint.py`. The checkpoint is a real
Ultralytics training checkpoint (1 epoch on the synthetic shapes set at imgsz 128, then stripped of its optimiser as
Ultralytics' `strip_optimizer` does), so loading it exercises what loading any user's old `best.pt` does.
"""

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
import numpy as np  # noqa: E402
import tood_yolo  # noqa: E402, F401
from tood_yolo.synthetic import make_synthetic_dataset  # noqa: E402
from ultralytics import YOLO  # noqa: E402

HERE = Path(__file__).resolve().parent
with tempfile.TemporaryDirectory() as tmp:
    data = make_synthetic_dataset(Path(tmp) / "syn", n_train=16, n_val=4, imgsz=128)
    model = YOLO(str(HERE / "tood-tiny.yaml"))
    model.train(data=str(data), epochs=1, imgsz=128, batch=8, device="cpu", workers=0, plots=False, val=False,
                project=tmp, name="run", seed=0, deterministic=True, recipe="mmdet", lr0=0.05)
    shutil.copy(Path(tmp) / "run/weights/last.pt", HERE / "tood-tiny.pt")
    image = sorted((Path(data).parent / "images/val").glob("*"))[0]
    shutil.copy(image, HERE / f"image{image.suffix}")
r = YOLO(str(HERE / "tood-tiny.pt"))(str(HERE / "image.jpg"), imgsz=128, conf=0.001, max_det=20)[0]
np.savez(HERE / "tood-tiny-boxes.npz", xyxy=r.boxes.xyxy.numpy(), conf=r.boxes.conf.numpy(), cls=r.boxes.cls.numpy())
print(len(r.boxes), "boxes")
