import sys

from recurdepth.data.procedural.cli import main

main(["procedural", *sys.argv[1:]])
