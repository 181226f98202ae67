"""``python3 -m clip_train.launch PROFILE [flags]``: what test/train_clip_*.sh run."""

import sys

from clip_train.launch.cli import main

sys.exit(main())
