import sys

from drifting_lightning.cli import main

sys.exit(main())
