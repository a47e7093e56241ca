"""Write thead_fpn_reference.npz: outputs of the FPN-form T-head before the multi-input form (commit d1fbba3).

Run once with that commit's head: `git show d1fbba3:tood_yolo/head.py > /tmp/head.py` then
`python tests/data/make_thead_fpn_reference.py /tmp/head.py`. Weights and inputs are float16-exact (stored as float16,
half the file) and random everywhere, so every path of the head shows in the outputs tests/test_yolo_neck.py compares.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_yolo_neck import FPN_CASES, REFERENCE  # noqa: E402

spec = importlib.util.spec_from_file_location("old_head", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
arrays, g = {}, torch.Generator().manual_seed(0)
for name, kw in FPN_CASES.items():
    head = old.TOODHead(**kw).eval()
    head.stride = torch.tensor([8.0 * 2**i for i in range(head.nl)])
    with torch.no_grad():
        for p in head.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * (0.1 if p.ndim > 1 else 0.5)).half())
        sizes = [(12, 10), (6, 5), (3, 3), (2, 2), (1, 1)][: head.nl]
        x = [torch.randn(2, kw["ch"][0], h, w, generator=g).half().float() for h, w in sizes]
        y, _ = head(x)
    arrays |= {f"{name}/state/{k}": v.half().numpy() for k, v in head.state_dict().items()}
    arrays |= {f"{name}/x/{i}": xi.half().numpy() for i, xi in enumerate(x)}
    arrays[f"{name}/y"] = y.numpy()
np.savez_compressed(REFERENCE, **arrays)
