from llmopt.cli.app import main

main()
