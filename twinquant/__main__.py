import sys

from twinquant.cli import main

sys.exit(main())
