import sys

from ssmkit.cli import main

sys.exit(main())
