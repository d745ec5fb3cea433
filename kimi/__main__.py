from kimi.cli import main

main()
