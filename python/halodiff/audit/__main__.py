"""python -m halodiff.audit: the static kernel audit (same options as `halodiff bench audit`)."""
import sys

from .report import main

sys.exit(main())
