import sys

from gpooler.cli import main

sys.exit(main())
