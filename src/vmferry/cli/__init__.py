"""The ``vmferry`` command (virsh's counterpart): see :mod:`vmferry.cli.main`.

A new command is one function in :mod:`vmferry.cli.commands` and one
:class:`~vmferry.cli.context.Command` entry in its ``COMMANDS`` table.
"""
