"""`python -m tood_yolo.tools.maps`: see `tood_yolo.tools.maps.cli`."""

import sys

from .cli import main
from .compute import NotTOODError

try:
    main()
except (NotTOODError, SyntaxError, FileNotFoundError) as err:
    sys.exit(f"error: {err}")
