"""``python -m driftscope_torch``: the driftscope-torch command line."""

from .cli import main

raise SystemExit(main())
