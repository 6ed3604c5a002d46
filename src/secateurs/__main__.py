import sys

from secateurs.cli.main import main

sys.exit(main())
