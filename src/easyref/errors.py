"""Exceptions shared by the library and the CLI."""


class UserError(Exception):
    """An error caused by the user's input (a file, a flag, a config value).

    The message names what is wrong and how to fix it; the CLI prints it without a traceback.
    """
