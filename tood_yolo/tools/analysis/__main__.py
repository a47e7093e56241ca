"""`python -m tood_yolo.tools.analysis`: see `tood_yolo.tools.analysis.cli`."""

from .cli import main

main()
