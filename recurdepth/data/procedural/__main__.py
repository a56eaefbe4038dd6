from recurdepth.data.procedural.cli import main

main(["procedural", *__import__("sys").argv[1:]])
