"""``python -m upreid`` (and ``torchrun -m upreid pretrain ...``) runs the ``upreid`` command."""
import sys

from upreid.cli import main

sys.exit(main())
