import sys

from trainables.editing.loop import main

sys.exit(main())
