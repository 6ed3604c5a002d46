import sys

from secateurs.cli import main

sys.exit(main())
