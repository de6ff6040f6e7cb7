import sys

from exactllm.cli import main

sys.exit(main())
