from openglm.cli import main

main()
