import sys

from mi_opt.cli import main

sys.exit(main())
