"""``python -m lora_monitor``: the ``lora-monitor`` command line (see :mod:`lora_monitor.cli`)."""

import sys

from lora_monitor.cli import main

sys.exit(main())
