"""The `crispedit` command line, outside the engine: `crispedit/` knows no web and no queue.

`main.py` assembles the parser from one module per verb group and maps errors to exit statuses;
`python -m crispedit_cli` and the `crispedit` console script both run `crispedit_cli.main.main`.
"""
