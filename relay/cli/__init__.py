"""The command line: ``main`` parses arguments and runs a command; the operator commands
(``send``, ``tail``, ``spool``, ``tokens``) live beside it."""
