import sys

from medusa_lora.cli import main

sys.exit(main())
