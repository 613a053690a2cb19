import sys

from dynamo_snapshot.cli.main import main

sys.exit(main(["operator", *sys.argv[1:]]))
