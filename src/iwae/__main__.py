import sys

from iwae.cli import main

sys.exit(main())
