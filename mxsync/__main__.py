import sys

from mxsync.cli import main

sys.exit(main())
