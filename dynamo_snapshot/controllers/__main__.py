import sys

from dynamo_snapshot.controllers.entry import main

sys.exit(main())
