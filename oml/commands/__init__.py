"""The suite's commands, one module per `oml` verb (the verb table is in oml/cli.py).

Each module holds one command: DESCRIPTION (its --help text, the same text as the docstring of the top-level script
it backs; tests/test_cli.py checks both), make_parser() (the argparse parser, built from the argument specs in
oml.core.run_config and the other oml modules) and main(argv=None), which parses argv (default: sys.argv[1:]) and runs it.
The top-level scripts and `oml VERB` call the same main(); oml.core.errors.run_cli turns bad input into one `error:`
line and exit status 2.
"""
